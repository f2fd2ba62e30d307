// aim_runner: runs an AOTInductor package of an AIM model (aim_ext.export.export_aoti) without
// Python, on an AIMT batch (aim_ext/export/tensor_file.py) or on PPM images, and writes the
// outputs as AIMT files and the masks as PGM images.
//
// The package calls our custom ops (aim::topdown_epilogue) through AOTI's proxy executor, which
// finds them in the dispatcher: this program links aim_ops for its TORCH_LIBRARY registrations.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <bit>
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

namespace fs = std::filesystem;
using at::Tensor;
using Metadata = std::unordered_map<std::string, std::string>;

// AIMT and PPM bytes are read and written as they lie in memory.
static_assert(std::endian::native == std::endian::little, "AIMT files are little-endian");

constexpr const char* kUsage =
    "usage: aim_runner PACKAGE.pt2 (--input BATCH.aimt | --image A.ppm [--image B.ppm ...])\n"
    "                  [--out DIR]\n"
    "  --input FILE  an AIMT float32 batch (N, 3, H, W), already normalised\n"
    "  --image FILE  a binary PPM (P6, maxval 255), resized and normalised as the package says\n"
    "  --out DIR     where the outputs go (default aim_runner_out): <name>.aimt per output,\n"
    "                <mask>_<i>.pgm per mask and sample\n";

[[noreturn]] void fail(const std::string& message) { throw std::runtime_error(message); }

std::string read_file(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) fail("cannot open " + path.string());
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream file(path, std::ios::binary);
  if (!file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()))) {
    fail("cannot write " + path.string());
  }
}

std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + ")";
}

// ---- AIMT: "AIMT", uint32 ndim (1..8), ndim x uint64 sizes, float32 values in C order.

Tensor load_aimt(const fs::path& path) {
  const std::string data = read_file(path);
  const auto error = [&](const std::string& what) { fail(path.string() + ": " + what); };
  if (data.size() < 8 || data.compare(0, 4, "AIMT") != 0) error("not an AIMT file (bad magic)");
  uint32_t ndim = 0;
  std::memcpy(&ndim, data.data() + 4, 4);
  if (ndim < 1 || ndim > 8) error("ndim " + std::to_string(ndim) + " is not in 1..8");
  const size_t offset = 8 + 8 * size_t{ndim};
  if (data.size() < offset) error("truncated header");
  std::vector<int64_t> sizes(ndim);
  std::memcpy(sizes.data(), data.data() + 8, 8 * size_t{ndim});
  size_t count = 1;  // checked on the way, so that no product overflows
  for (int64_t size : sizes) {
    if (size < 0 || (size > 0 && count > data.size() / static_cast<size_t>(size))) {
      error("truncated: shape " + shape_str(sizes) + " does not fit in " + std::to_string(data.size()) +
            " bytes");
    }
    count *= static_cast<size_t>(size);
  }
  if (data.size() != offset + 4 * count) {
    error((data.size() < offset + 4 * count ? "truncated: " : "trailing bytes: ") +
          std::to_string(data.size()) + " bytes, shape " + shape_str(sizes) + " needs " +
          std::to_string(offset + 4 * count));
  }
  Tensor t = at::empty(sizes, at::kFloat);
  std::memcpy(t.data_ptr<float>(), data.data() + offset, 4 * count);
  return t;
}

void save_aimt(const fs::path& path, const Tensor& tensor) {
  const Tensor t = tensor.to(at::kCPU, at::kFloat).contiguous();
  const auto ndim = static_cast<uint32_t>(t.dim());
  std::string bytes = "AIMT";
  bytes.append(reinterpret_cast<const char*>(&ndim), 4);
  for (int64_t size : t.sizes()) bytes.append(reinterpret_cast<const char*>(&size), 8);
  bytes.append(reinterpret_cast<const char*>(t.data_ptr<float>()), 4 * t.numel());
  write_file(path, bytes);
}

// ---- PPM (P6, maxval 255) in, PGM (P5) out.

Tensor load_ppm(const fs::path& path) {
  const std::string data = read_file(path);
  size_t pos = 0;
  const auto error = [&](const std::string& what) { fail(path.string() + ": " + what); };
  const auto space_at = [&](size_t i) {
    return i < data.size() && std::isspace(static_cast<unsigned char>(data[i]));
  };
  // The header: whitespace-separated numbers, '#' comments running to the end of the line.
  const auto next_number = [&]() -> long {
    while (space_at(pos) || (pos < data.size() && data[pos] == '#')) {
      if (data[pos] == '#') pos = std::min(data.find('\n', pos), data.size());
      else ++pos;
    }
    const size_t start = pos;
    while (pos < data.size() && std::isdigit(static_cast<unsigned char>(data[pos]))) ++pos;
    if (pos == start || pos - start > 9) error("malformed PPM header");
    return std::stol(data.substr(start, pos - start));
  };
  if (data.compare(0, 2, "P6") != 0 || !space_at(2)) error("not a binary PPM (P6) image");
  pos = 2;
  const long width = next_number(), height = next_number(), maxval = next_number();
  if (width < 1 || height < 1) error("PPM image has no pixels");
  if (maxval != 255) error("PPM maxval " + std::to_string(maxval) + " (only 255 is supported)");
  if (!space_at(pos++)) error("malformed PPM header");  // one whitespace byte ends it
  const size_t need = static_cast<size_t>(width) * height * 3;
  if (data.size() - pos < need) {
    error("truncated PPM: " + std::to_string(width) + "x" + std::to_string(height) + " needs " +
          std::to_string(need) + " bytes of pixels");
  }
  Tensor hwc = at::empty({height, width, 3}, at::kByte);
  std::memcpy(hwc.data_ptr<uint8_t>(), data.data() + pos, need);
  return hwc.permute({2, 0, 1}).to(at::kFloat).div_(255).unsqueeze(0);  // (1, 3, h, w) in [0, 1]
}

void save_pgm(const fs::path& path, const Tensor& mask) {  // mask: (h, w), binary
  const Tensor pixels = mask.gt(0.5).to(at::kByte).mul_(255).contiguous();
  std::string bytes = "P5\n" + std::to_string(mask.size(1)) + " " + std::to_string(mask.size(0)) + "\n255\n";
  bytes.append(reinterpret_cast<const char*>(pixels.data_ptr<uint8_t>()), pixels.numel());
  write_file(path, bytes);
}

// ---- Metadata written by the exporter (all strings).

std::string meta(const Metadata& metadata, const std::string& key) {
  const auto it = metadata.find("aim_ext." + key);
  if (it == metadata.end()) fail("the package has no aim_ext." + key + " metadata (not from export_aoti?)");
  return it->second;
}

std::vector<std::string> split(const std::string& text) {
  std::vector<std::string> parts;
  std::stringstream stream(text);
  for (std::string part; std::getline(stream, part, ',');) parts.push_back(part);
  return parts;
}

std::vector<double> meta_numbers(const Metadata& metadata, const std::string& key, size_t count) {
  const std::string text = meta(metadata, key);
  std::vector<double> numbers;
  bool ok = true;
  for (const std::string& part : split(text)) {
    char* end = nullptr;
    numbers.push_back(std::strtod(part.c_str(), &end));
    ok = ok && !part.empty() && *end == '\0';
  }
  if (!ok || numbers.size() != count) {
    fail("metadata aim_ext." + key + " = '" + text + "' is not " + std::to_string(count) + " numbers");
  }
  return numbers;
}

// Resized as Python's F.interpolate(x, size, mode="bilinear", align_corners=False,
// antialias=True) does, which takes the antialiasing kernel whether it shrinks or enlarges (the
// plain bilinear one differs from it by ~1e-6 when enlarging), then normalised.
Tensor preprocess(const Tensor& image, int64_t height, int64_t width, const Tensor& mean, const Tensor& std) {
  const Tensor resized = at::_upsample_bilinear2d_aa(image, at::IntArrayRef{height, width},
                                                     /*align_corners=*/false, std::nullopt);
  return (resized - mean) / std;
}

struct Args {
  std::string package, out = "aim_runner_out", input;
  std::vector<std::string> images;
};

Args parse_args(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) fail(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--input") args.input = value();
    else if (arg == "--image") args.images.push_back(value());
    else if (arg == "--out") args.out = value();
    else if (arg.starts_with("-")) fail("unknown option " + arg);
    else if (args.package.empty()) args.package = arg;
    else fail("more than one package: " + args.package + ", " + arg);
  }
  if (args.package.empty()) fail("no package given");
  if (args.input.empty() == args.images.empty()) fail("give either --input or --image (not both)");
  return args;
}

struct Package {
  Metadata metadata;
  std::vector<std::string> names;  // of the outputs: logits, then the masks, top stage first
  int64_t height = 0, width = 0;
  bool cuda = false;
  std::string dtype_name = "float32";
  at::ScalarType dtype = at::kFloat;  // of the input the package takes
};

Package describe(const Metadata& metadata) {
  Package p{metadata, split(meta(metadata, "outputs"))};
  const std::vector<double> size = meta_numbers(metadata, "image_size", 2);
  p.height = static_cast<int64_t>(size[0]), p.width = static_cast<int64_t>(size[1]);
  const auto device = metadata.find("AOTI_DEVICE_KEY");
  p.cuda = device != metadata.end() && device->second == "cuda";
  const auto dtype = metadata.find("aim_ext.dtype");  // float32 when absent
  if (dtype != metadata.end()) p.dtype_name = dtype->second;
  const std::unordered_map<std::string, at::ScalarType> dtypes = {
      {"float32", at::kFloat}, {"float16", at::kHalf}, {"bfloat16", at::kBFloat16}};
  const auto found = dtypes.find(p.dtype_name);
  if (found == dtypes.end()) fail("unsupported package dtype " + p.dtype_name);
  p.dtype = found->second;
  std::printf("model %s (%s, %s): %s classes, image %ldx%ld, mean %s, std %s, outputs %s\n",
              meta(metadata, "model").c_str(), p.cuda ? "cuda" : "cpu", p.dtype_name.c_str(),
              meta(metadata, "num_classes").c_str(), p.height, p.width, meta(metadata, "mean").c_str(),
              meta(metadata, "std").c_str(), meta(metadata, "outputs").c_str());
  return p;
}

Tensor make_batch(const Args& args, const Package& p) {
  if (!args.input.empty()) {
    Tensor batch = load_aimt(args.input);
    if (batch.dim() != 4 || batch.size(1) != 3 || batch.size(2) != p.height || batch.size(3) != p.width) {
      fail(args.input + ": expected shape (N, 3, " + std::to_string(p.height) + ", " +
           std::to_string(p.width) + "), found " + shape_str(batch.sizes()));
    }
    return batch;
  }
  const auto stats = [&](const char* key) {
    return at::tensor(meta_numbers(p.metadata, key, 3)).to(at::kFloat).view({1, 3, 1, 1});
  };
  const Tensor mean = stats("mean"), std = stats("std");
  std::vector<Tensor> images;
  for (const std::string& path : args.images) {
    images.push_back(preprocess(load_ppm(path), p.height, p.width, mean, std));
  }
  return at::cat(images);
}

void report(const Args& args, const Package& p, const std::vector<Tensor>& outputs) {
  fs::create_directories(args.out);
  const Tensor logits = outputs[0].to(at::kCPU, at::kFloat);
  const int64_t k = std::min<int64_t>(5, logits.size(1));
  const auto [values, classes] = logits.topk(k);
  for (int64_t n = 0; n < logits.size(0); ++n) {
    std::printf("sample %ld: top-%ld", n, k);
    for (int64_t j = 0; j < k; ++j) {
      std::printf("  %ld (%.4f)", classes[n][j].item<int64_t>(), values[n][j].item<float>());
    }
    std::printf("\n");
  }
  for (size_t i = 0; i < outputs.size(); ++i) {
    const Tensor output = outputs[i].to(at::kCPU, at::kFloat);
    save_aimt(fs::path(args.out) / (p.names[i] + ".aimt"), output);
    if (i == 0) continue;  // the logits; the masks follow, (N, 1, h, w)
    std::printf("%s %s: active %.4f (per sample", p.names[i].c_str(), shape_str(output.sizes()).c_str(),
                output.mean().item<float>());
    for (int64_t n = 0; n < output.size(0); ++n) {
      std::printf(" %.4f", output[n].mean().item<float>());
      save_pgm(fs::path(args.out) / (p.names[i] + "_" + std::to_string(n) + ".pgm"), output[n][0]);
    }
    std::printf(")\n");
  }
  std::printf("wrote %s\n", args.out.c_str());
}

void run(const Args& args) {
  if (!fs::is_regular_file(args.package)) fail("package not found: " + args.package);
  torch::inductor::AOTIModelPackageLoader loader(args.package);
  const Package p = describe(loader.get_metadata());
  const Tensor batch = make_batch(args, p);
  const std::vector<Tensor> outputs =
      loader.run({batch.to(p.cuda ? at::kCUDA : at::kCPU, p.dtype).contiguous()});
  if (outputs.size() != p.names.size()) {
    fail("the package returned " + std::to_string(outputs.size()) + " outputs, its metadata names " +
         std::to_string(p.names.size()));
  }
  report(args, p, outputs);
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
  }
  try {
    run(parse_args(argc, argv));
    return 0;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "aim_runner: error: %s\n", e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "aim_runner: error: %s\n", e.what());
  }
  return 1;
}
