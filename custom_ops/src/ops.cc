// onnxruntime glue: op descriptors, attribute/shape validation, CPU compute, CUDA dispatch, registration.
// Everything that can go wrong with a model comes back as an OrtStatus naming the node and the problem:
// attributes are checked when the kernel is created (session creation), shapes when it runs.
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "../cuda/lowbit_cuda.h"
#include "lowbit.h"
#include "ort_abi.h"

#if defined(_WIN32)
#define OA_EXPORT __declspec(dllexport)
#else
#define OA_EXPORT __attribute__((visibility("default")))
#endif

namespace {

constexpr const char* kDomain = "com.optimum.adaround";
constexpr const char* kCudaEp = "CUDAExecutionProvider";

enum class Kind { LowBit, Codebook };

struct OpDef : OrtCustomOp {
  Kind kind;
  bool cuda;
  ONNXTensorElementDataType t;  // X / Y / bias type
};

const char* op_name(Kind k) { return k == Kind::LowBit ? "MatMulLowBit" : "MatMulCodebook"; }

// A failure while validating or computing; turned into an OrtStatus at the C boundary.
struct OpError : std::exception {
  std::string msg;
  explicit OpError(std::string m) : msg(std::move(m)) {}
  const char* what() const noexcept override { return msg.c_str(); }
};

// Releases an ORT status we got back and rethrows its message with our context.
void check(const OrtApi* api, OrtStatus* st, const std::string& what) {
  if (!st) return;
  std::string m = what + ": " + api->GetErrorMessage(st);
  api->ReleaseStatus(st);
  throw OpError(m);
}

struct TensorInfo {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
  size_t count = 0;
};

TensorInfo tensor_info(const OrtApi* api, const OrtValue* v) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(api, api->GetTensorTypeAndShape(v, &info), "GetTensorTypeAndShape");
  TensorInfo t;
  size_t nd = 0;
  OrtStatus* st = api->GetTensorElementType(info, &t.type);
  if (!st) st = api->GetDimensionsCount(info, &nd);
  if (!st) {
    t.dims.resize(nd);
    st = api->GetDimensions(info, t.dims.data(), nd);
  }
  if (!st) st = api->GetTensorShapeElementCount(info, &t.count);
  api->ReleaseTensorTypeAndShapeInfo(info);
  check(api, st, "reading tensor shape");
  return t;
}

std::string shape_str(const std::vector<int64_t>& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    default: return "another type";
  }
}

struct Kernel {
  const OrtApi* api;
  const OpDef* def;
  std::string where;  // "MatMulLowBit node 'name'"
  oa::GemmShape shape;
  int accuracy_level = 0;
  ONNXTensorElementDataType scales_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;

  [[noreturn]] void fail(const std::string& m) const { throw OpError(where + ": " + m); }
};

int64_t required_int(const OrtApi* api, const OrtKernelInfo* info, const char* name, const std::string& where) {
  int64_t v = 0;
  if (OrtStatus* st = api->KernelInfoGetAttribute_int64(info, name, &v)) {
    api->ReleaseStatus(st);
    throw OpError(where + ": missing required int attribute '" + name + "'");
  }
  return v;
}

std::string node_name(const OrtApi* api, const OrtKernelInfo* info) {
  size_t size = 0;
  if (OrtStatus* st = api->KernelInfo_GetNodeName(info, nullptr, &size)) {
    api->ReleaseStatus(st);
    return "?";
  }
  std::string s(size, '\0');
  if (OrtStatus* st = api->KernelInfo_GetNodeName(info, s.data(), &size)) {
    api->ReleaseStatus(st);
    return "?";
  }
  if (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

ONNXTensorElementDataType input_type(const OrtApi* api, const OrtKernelInfo* info, size_t i) {
  OrtTypeInfo* ti = nullptr;
  check(api, api->KernelInfo_GetInputTypeInfo(info, i, &ti), "KernelInfo_GetInputTypeInfo");
  const OrtTensorTypeAndShapeInfo* tsi = nullptr;
  ONNXTensorElementDataType t = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  OrtStatus* st = api->CastTypeInfoToTensorInfo(ti, &tsi);
  if (!st && tsi) st = api->GetTensorElementType(tsi, &t);
  api->ReleaseTypeInfo(ti);
  check(api, st, "reading input type");
  return t;
}

// Attribute validation at session creation.
Kernel* make_kernel(const OpDef* def, const OrtApi* api, const OrtKernelInfo* info) {
  auto k = std::make_unique<Kernel>();
  k->api = api;
  k->def = def;
  k->where = std::string(op_name(def->kind)) + " node '" + node_name(api, info) + "'";
  const std::string& w = k->where;
  const int64_t K = required_int(api, info, "K", w), N = required_int(api, info, "N", w);
  const int64_t bits = required_int(api, info, "bits", w), bs = required_int(api, info, "block_size", w);
  int64_t acc = 0;
  if (OrtStatus* st = api->KernelInfoGetAttribute_int64(info, "accuracy_level", &acc)) {
    api->ReleaseStatus(st);
    acc = 0;
  }
  if (K < 1 || K > (int64_t{1} << 31)) k->fail("attribute K=" + std::to_string(K) + " must be in 1..2^31");
  if (N < 1 || N > (int64_t{1} << 31)) k->fail("attribute N=" + std::to_string(N) + " must be in 1..2^31");
  if (bits < 2 || bits > 8) k->fail("attribute bits=" + std::to_string(bits) + " is not supported (use 2..8)");
  const bool pow2 = bs >= 16 && (bs & (bs - 1)) == 0;
  if (!pow2 && bs != K)
    k->fail("attribute block_size=" + std::to_string(bs) + " must be a power of two >= 16, or equal K=" +
            std::to_string(K) + " (one block per channel)");
  if (acc < 0 || acc > 4) k->fail("attribute accuracy_level=" + std::to_string(acc) + " must be in 0..4");
  k->shape.K = K;
  k->shape.N = N;
  k->shape.bits = static_cast<int>(bits);
  k->shape.block_size = bs;
  k->accuracy_level = static_cast<int>(acc);

  size_t n_in = 0;
  check(api, api->KernelInfo_GetInputCount(info, &n_in), "KernelInfo_GetInputCount");
  if (n_in < 3) k->fail("needs at least 3 inputs (X, B, scales), got " + std::to_string(n_in));
  if (def->kind == Kind::Codebook && n_in < 4) k->fail("needs a codebook input (input 3)");
  k->scales_type = input_type(api, info, 2);
  if (k->scales_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && k->scales_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
    k->fail(std::string("scales must be float32 or float16, got ") + type_name(k->scales_type));
  return k.release();
}

// Inputs of one call, validated against the attributes.
struct Inputs {
  const OrtValue *x = nullptr, *b = nullptr, *scales = nullptr, *zp = nullptr, *codebook = nullptr,
                 *bias = nullptr;
  TensorInfo xi;
  int64_t M = 0;
};

const void* data_of(const OrtApi* api, const OrtValue* v) {
  void* p = nullptr;
  check(api, api->GetTensorMutableData(const_cast<OrtValue*>(v), &p), "GetTensorMutableData");
  return p;
}

Inputs gather_inputs(const Kernel& k, OrtKernelContext* ctx) {
  const OrtApi* api = k.api;
  const oa::GemmShape& sh = k.shape;
  size_t n_in = 0;
  check(api, api->KernelContext_GetInputCount(ctx, &n_in), "KernelContext_GetInputCount");
  auto input = [&](size_t i) -> const OrtValue* {
    if (i >= n_in) return nullptr;
    const OrtValue* v = nullptr;
    check(api, api->KernelContext_GetInput(ctx, i, &v), "KernelContext_GetInput");
    return v;
  };
  Inputs in;
  in.x = input(0);
  in.b = input(1);
  in.scales = input(2);
  if (!in.x || !in.b || !in.scales) k.fail("inputs X, B and scales are required");
  if (k.def->kind == Kind::LowBit) {
    in.zp = input(3);
  } else {
    in.codebook = input(3);
    if (!in.codebook) k.fail("input codebook is required");
  }
  in.bias = input(4);

  in.xi = tensor_info(api, in.x);
  if (in.xi.dims.empty() || in.xi.dims.back() != sh.K)
    k.fail("X has shape " + shape_str(in.xi.dims) + ": its last dimension must equal K=" + std::to_string(sh.K));
  in.M = sh.K ? static_cast<int64_t>(in.xi.count) / sh.K : 0;

  const TensorInfo bi = tensor_info(api, in.b);
  const int64_t want_b = sh.N * sh.row_bytes();
  if (static_cast<int64_t>(bi.count) != want_b)
    k.fail("B has " + std::to_string(bi.count) + " bytes " + shape_str(bi.dims) + ", expected N*ceil(K/32)*4*bits = " +
           std::to_string(want_b) + " for N=" + std::to_string(sh.N) + ", K=" + std::to_string(sh.K) +
           ", bits=" + std::to_string(sh.bits));

  const int64_t want_s = sh.N * sh.n_blocks();
  const TensorInfo si = tensor_info(api, in.scales);
  if (si.type != k.scales_type) k.fail(std::string("scales changed type to ") + type_name(si.type));
  if (static_cast<int64_t>(si.count) != want_s)
    k.fail("scales has " + std::to_string(si.count) + " values " + shape_str(si.dims) + ", expected N*n_blocks = " +
           std::to_string(want_s) + " (N=" + std::to_string(sh.N) + ", n_blocks=" + std::to_string(sh.n_blocks()) + ")");

  if (in.zp) {
    const TensorInfo zi = tensor_info(api, in.zp);
    if (zi.count == 0) {
      in.zp = nullptr;  // an empty tensor stands for "no zero points"
    } else if (static_cast<int64_t>(zi.count) != want_s) {
      k.fail("zero_points has " + std::to_string(zi.count) + " values " + shape_str(zi.dims) +
             ", expected N*n_blocks = " + std::to_string(want_s));
    }
  }
  if (in.codebook) {
    const TensorInfo ci = tensor_info(api, in.codebook);
    if (ci.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) k.fail("codebook must be float32");
    if (static_cast<int64_t>(ci.count) != (int64_t{1} << sh.bits))
      k.fail("codebook has " + std::to_string(ci.count) + " entries, expected 2^bits = " +
             std::to_string(1 << sh.bits));
  }
  if (in.bias) {
    const TensorInfo bi2 = tensor_info(api, in.bias);
    if (bi2.count == 0) {
      in.bias = nullptr;
    } else if (static_cast<int64_t>(bi2.count) != sh.N) {
      k.fail("bias has " + std::to_string(bi2.count) + " values, expected N=" + std::to_string(sh.N));
    }
  }
  return in;
}

OrtValue* make_output(const Kernel& k, OrtKernelContext* ctx, const Inputs& in) {
  std::vector<int64_t> dims = in.xi.dims;
  dims.back() = k.shape.N;
  OrtValue* y = nullptr;
  check(k.api, k.api->KernelContext_GetOutput(ctx, 0, dims.data(), dims.size(), &y), "KernelContext_GetOutput");
  return y;
}

struct PoolRunner {
  const OrtApi* api;
  OrtKernelContext* ctx;
  OrtStatus* status = nullptr;
};

void parallel_for(void* runner, void (*fn)(void*, size_t), size_t total, void* fn_ctx) {
  auto* r = static_cast<PoolRunner*>(runner);
  if (total <= 1) {
    for (size_t i = 0; i < total; ++i) fn(fn_ctx, i);
    return;
  }
  r->status = r->api->KernelContext_ParallelFor(r->ctx, fn, total, 0, fn_ctx);
}

std::vector<float> to_float(const void* src, ONNXTensorElementDataType t, size_t n) {
  std::vector<float> out(n);
  if (t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
    oa::half_to_float(static_cast<const uint16_t*>(src), out.data(), n);
  else
    std::memcpy(out.data(), src, n * sizeof(float));
  return out;
}

void compute_cpu(const Kernel& k, OrtKernelContext* ctx) {
  const OrtApi* api = k.api;
  const Inputs in = gather_inputs(k, ctx);
  OrtValue* yv = make_output(k, ctx, in);
  oa::GemmShape sh = k.shape;
  sh.M = in.M;
  if (sh.M == 0) return;
  const bool half = k.def->t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  const int64_t kpad = sh.n_chunks() * oa::kChunk;

  // X as fp32 rows zero-padded to whole chunks, so the kernels never read past K.
  std::vector<float> x(static_cast<size_t>(sh.M * kpad), 0.0f);
  const void* xsrc = data_of(api, in.x);
  for (int64_t m = 0; m < sh.M; ++m) {
    if (half)
      oa::half_to_float(static_cast<const uint16_t*>(xsrc) + m * sh.K, x.data() + m * kpad, static_cast<size_t>(sh.K));
    else
      std::memcpy(x.data() + m * kpad, static_cast<const float*>(xsrc) + m * sh.K, sizeof(float) * sh.K);
  }
  // Scales and zero points are read in place; the kernels convert one row at a time.
  std::vector<float> bias, cb;
  if (k.def->kind == Kind::Codebook)
    cb = to_float(data_of(api, in.codebook), ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, size_t{1} << sh.bits);
  if (in.bias) bias = to_float(data_of(api, in.bias), k.def->t, static_cast<size_t>(sh.N));

  void* yraw = nullptr;
  check(api, api->GetTensorMutableData(yv, &yraw), "GetTensorMutableData");
  std::vector<float> ytmp;
  float* y = static_cast<float*>(yraw);
  if (half) {
    ytmp.resize(static_cast<size_t>(sh.M * sh.N));
    y = ytmp.data();
  }

  oa::CpuProblem p;
  p.shape = sh;
  p.x = x.data();
  p.b = static_cast<const uint8_t*>(data_of(api, in.b));
  p.scales = data_of(api, in.scales);
  p.scales_half = k.scales_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  p.zp = in.zp ? static_cast<const uint8_t*>(data_of(api, in.zp)) : nullptr;
  p.codebook = cb.empty() ? nullptr : cb.data();
  p.bias = bias.empty() ? nullptr : bias.data();
  p.y = y;
  p.accuracy_level = k.accuracy_level;
  PoolRunner runner{api, ctx};
  oa::cpu_gemm(p, parallel_for, &runner);
  check(api, runner.status, k.where + ": KernelContext_ParallelFor");
  if (half) oa::float_to_half(y, static_cast<uint16_t*>(yraw), ytmp.size());
}

void compute_cuda(const Kernel& k, OrtKernelContext* ctx) {
  if (!oa_has_cuda()) k.fail("this build of the library has no CUDA kernels");
  const OrtApi* api = k.api;
  const Inputs in = gather_inputs(k, ctx);
  OrtValue* yv = make_output(k, ctx, in);
  if (in.M == 0) return;
  void* stream = nullptr;
  check(api, api->KernelContext_GetGPUComputeStream(ctx, &stream), "KernelContext_GetGPUComputeStream");
  void* y = nullptr;
  check(api, api->GetTensorMutableData(yv, &y), "GetTensorMutableData");
  OaCudaArgs a{};
  a.x = data_of(api, in.x);
  a.b = static_cast<const uint8_t*>(data_of(api, in.b));
  a.scales = data_of(api, in.scales);
  a.zp = in.zp ? static_cast<const uint8_t*>(data_of(api, in.zp)) : nullptr;
  a.codebook = in.codebook ? static_cast<const float*>(data_of(api, in.codebook)) : nullptr;
  a.bias = in.bias ? data_of(api, in.bias) : nullptr;
  a.y = y;
  a.M = in.M;
  a.K = k.shape.K;
  a.N = k.shape.N;
  a.block_size = k.shape.block_size;
  a.bits = k.shape.bits;
  a.x_half = k.def->t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  a.scales_half = k.scales_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  const int err = oa_lowbit_matmul_cuda(&a, stream);
  if (err != 0) k.fail(std::string("CUDA launch failed: ") + oa_cuda_error_string(err));
}

// ---- OrtCustomOp callbacks -----------------------------------------------------------------------------
const OpDef* def_of(const OrtCustomOp* op) { return static_cast<const OpDef*>(op); }

OrtStatus* create_kernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  try {
    *out = make_kernel(def_of(op), api, info);
    return nullptr;
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  }
}

OrtStatus* compute(void* kernel, OrtKernelContext* ctx) {
  const Kernel& k = *static_cast<const Kernel*>(kernel);
  try {
    if (k.def->cuda)
      compute_cuda(k, ctx);
    else
      compute_cpu(k, ctx);
    return nullptr;
  } catch (const OpError& e) {
    return k.api->CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  } catch (const std::exception& e) {
    return k.api->CreateStatus(ORT_FAIL, (k.where + ": " + e.what()).c_str());
  }
}

void destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }

const char* get_name(const OrtCustomOp* op) { return op_name(def_of(op)->kind); }
const char* get_ep(const OrtCustomOp* op) { return def_of(op)->cuda ? kCudaEp : nullptr; }
size_t n_inputs(const OrtCustomOp*) { return 5; }
size_t n_outputs(const OrtCustomOp*) { return 1; }

ONNXTensorElementDataType in_type(const OrtCustomOp* op, size_t i) {
  const OpDef* d = def_of(op);
  switch (i) {
    case 0: return d->t;
    case 1: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    case 2: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // float32 or float16, checked at creation
    case 3:
      return d->kind == Kind::LowBit ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    default: return d->t;
  }
}
ONNXTensorElementDataType out_type(const OrtCustomOp* op, size_t) { return def_of(op)->t; }

OrtCustomOpInputOutputCharacteristic in_char(const OrtCustomOp* op, size_t i) {
  if (i < 3) return INPUT_OUTPUT_REQUIRED;
  if (i == 3 && def_of(op)->kind == Kind::Codebook) return INPUT_OUTPUT_REQUIRED;
  return INPUT_OUTPUT_OPTIONAL;
}
OrtCustomOpInputOutputCharacteristic out_char(const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; }
OrtMemType in_mem(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int start_version(const OrtCustomOp*) { return 1; }
int end_version(const OrtCustomOp*) { return 1; }

OpDef make_def(Kind kind, bool cuda, ONNXTensorElementDataType t) {
  OpDef d{};
  d.version = OA_ORT_API_VERSION;
  d.GetName = get_name;
  d.GetExecutionProviderType = get_ep;
  d.GetInputType = in_type;
  d.GetInputTypeCount = n_inputs;
  d.GetOutputType = out_type;
  d.GetOutputTypeCount = n_outputs;
  d.KernelDestroy = destroy_kernel;
  d.GetInputCharacteristic = in_char;
  d.GetOutputCharacteristic = out_char;
  d.GetInputMemoryType = in_mem;
  d.CreateKernelV2 = create_kernel;
  d.KernelComputeV2 = compute;
  d.GetStartVersion = start_version;
  d.GetEndVersion = end_version;
  d.kind = kind;
  d.cuda = cuda;
  d.t = t;
  return d;
}

std::vector<OpDef>& op_defs() {
  static std::vector<OpDef> defs = [] {
    std::vector<OpDef> v;
    for (bool cuda : {false, true}) {
      if (cuda && !oa_has_cuda()) continue;
      for (Kind kind : {Kind::LowBit, Kind::Codebook})
        for (auto t : {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16})
          v.push_back(make_def(kind, cuda, t));
    }
    return v;
  }();
  return defs;
}

}  // namespace

extern "C" OA_EXPORT OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  const OrtApi* api = base->GetApi(OA_ORT_API_VERSION);
  if (!api) {
    // Every runtime serves table version 1, whose first entry is CreateStatus.
    const OrtApi* v1 = base->GetApi(1);
    std::string m = std::string("optimum-adaround custom ops need onnxruntime >= 1.17 (C API version 17); this is ") +
                    base->GetVersionString();
    return v1 ? v1->CreateStatus(ORT_FAIL, m.c_str()) : nullptr;
  }
  // Domains must outlive every session that uses them: created once per registration, never freed.
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain(kDomain, &domain)) return st;
  for (const OpDef& d : op_defs())
    if (OrtStatus* st = api->CustomOpDomain_Add(domain, &d)) return st;
  return api->AddCustomOpDomain(options, domain);
}
