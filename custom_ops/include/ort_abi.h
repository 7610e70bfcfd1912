// Our own declarations of the part of onnxruntime's C ABI this library uses.
//
// onnxruntime wheels ship no headers, so we declare just what we call. The OrtApi function table is an
// append-only struct of function pointers: an entry's byte offset is fixed forever by its index, so
// unused entries are declared as opaque padding and every used entry is pinned by a static_assert on
// its index. We request table version 17 (onnxruntime >= 1.17): the highest entry used here
// (KernelContext_ParallelFor, index 274) was added in that version.
#pragma once

#include <cstddef>
#include <cstdint>

extern "C" {

struct OrtStatus;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTypeInfo;
struct OrtTensorTypeAndShapeInfo;
struct OrtShapeInferContext;

// Subset of OrtErrorCode (values are part of the ABI).
enum OrtErrorCode : int { ORT_OK = 0, ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };

// Tensor element types used here (values are the ONNX TensorProto data types).
enum ONNXTensorElementDataType : int {
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED = 0,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 = 2,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 = 10,
};

enum OrtCustomOpInputOutputCharacteristic : int {
  INPUT_OUTPUT_REQUIRED = 0,
  INPUT_OUTPUT_OPTIONAL = 1,
  INPUT_OUTPUT_VARIADIC = 2,
};

enum OrtMemType : int { OrtMemTypeCPUInput = -2, OrtMemTypeCPUOutput = -1, OrtMemTypeDefault = 0 };

#define OA_ORT_API_VERSION 17
#define OA_PAD(first, last) void* unused_##first##_##last[(last) - (first) + 1]

struct OrtApi {
  OrtStatus* (*CreateStatus)(OrtErrorCode code, const char* msg);                                    // 0
  OrtErrorCode (*GetErrorCode)(const OrtStatus* status);                                             // 1
  const char* (*GetErrorMessage)(const OrtStatus* status);                                           // 2
  OA_PAD(3, 25);
  OrtStatus* (*CreateCustomOpDomain)(const char* domain, OrtCustomOpDomain** out);                   // 26
  OrtStatus* (*CustomOpDomain_Add)(OrtCustomOpDomain* domain, const struct OrtCustomOp* op);         // 27
  OrtStatus* (*AddCustomOpDomain)(OrtSessionOptions* options, OrtCustomOpDomain* domain);            // 28
  OA_PAD(29, 50);
  OrtStatus* (*GetTensorMutableData)(OrtValue* value, void** out);                                   // 51
  OA_PAD(52, 54);
  OrtStatus* (*CastTypeInfoToTensorInfo)(const OrtTypeInfo* type_info,
                                         const OrtTensorTypeAndShapeInfo** out);                     // 55
  OA_PAD(56, 59);
  OrtStatus* (*GetTensorElementType)(const OrtTensorTypeAndShapeInfo* info,
                                     ONNXTensorElementDataType* out);                                // 60
  OrtStatus* (*GetDimensionsCount)(const OrtTensorTypeAndShapeInfo* info, size_t* out);              // 61
  OrtStatus* (*GetDimensions)(const OrtTensorTypeAndShapeInfo* info, int64_t* dims, size_t n);       // 62
  OA_PAD(63, 63);
  OrtStatus* (*GetTensorShapeElementCount)(const OrtTensorTypeAndShapeInfo* info, size_t* out);      // 64
  OrtStatus* (*GetTensorTypeAndShape)(const OrtValue* value, OrtTensorTypeAndShapeInfo** out);       // 65
  OA_PAD(66, 84);
  OrtStatus* (*KernelInfoGetAttribute_float)(const OrtKernelInfo* info, const char* name, float* out);   // 85
  OrtStatus* (*KernelInfoGetAttribute_int64)(const OrtKernelInfo* info, const char* name, int64_t* out); // 86
  OA_PAD(87, 87);
  OrtStatus* (*KernelContext_GetInputCount)(const OrtKernelContext* ctx, size_t* out);               // 88
  OrtStatus* (*KernelContext_GetOutputCount)(const OrtKernelContext* ctx, size_t* out);              // 89
  OrtStatus* (*KernelContext_GetInput)(const OrtKernelContext* ctx, size_t index, const OrtValue** out);  // 90
  OrtStatus* (*KernelContext_GetOutput)(OrtKernelContext* ctx, size_t index, const int64_t* dims,
                                        size_t dim_count, OrtValue** out);                           // 91
  OA_PAD(92, 92);
  void (*ReleaseStatus)(OrtStatus* status);                                                          // 93
  OA_PAD(94, 97);
  void (*ReleaseTypeInfo)(OrtTypeInfo* info);                                                        // 98
  void (*ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo* info);                            // 99
  OA_PAD(100, 192);
  OrtStatus* (*KernelContext_GetGPUComputeStream)(const OrtKernelContext* ctx, void** out);          // 193
  OA_PAD(194, 229);
  OrtStatus* (*KernelInfo_GetInputCount)(const OrtKernelInfo* info, size_t* out);                    // 230
  OrtStatus* (*KernelInfo_GetOutputCount)(const OrtKernelInfo* info, size_t* out);                   // 231
  OA_PAD(232, 233);
  OrtStatus* (*KernelInfo_GetInputTypeInfo)(const OrtKernelInfo* info, size_t index, OrtTypeInfo** out);  // 234
  OA_PAD(235, 243);
  OrtStatus* (*KernelInfo_GetNodeName)(const OrtKernelInfo* info, char* out, size_t* size);          // 244
  OA_PAD(245, 273);
  OrtStatus* (*KernelContext_ParallelFor)(const OrtKernelContext* ctx, void (*fn)(void*, size_t),
                                          size_t total, size_t num_batch, void* user_data);          // 274
};

#undef OA_PAD

struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

// The custom-op descriptor. ORT reads only the fields that exist in the `version` it is given.
struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char* (*GetName)(const OrtCustomOp* op);
  const char* (*GetExecutionProviderType)(const OrtCustomOp* op);
  ONNXTensorElementDataType (*GetInputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const OrtCustomOp* op);
  ONNXTensorElementDataType (*GetOutputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const OrtCustomOp* op);
  void (*KernelCompute)(void* kernel, OrtKernelContext* ctx);
  void (*KernelDestroy)(void* kernel);
  OrtCustomOpInputOutputCharacteristic (*GetInputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtCustomOpInputOutputCharacteristic (*GetOutputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtMemType (*GetInputMemoryType)(const OrtCustomOp* op, size_t index);
  int (*GetVariadicInputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp* op);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp* op);
  OrtStatus* (*CreateKernelV2)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** kernel);
  OrtStatus* (*KernelComputeV2)(void* kernel, OrtKernelContext* ctx);
  OrtStatus* (*InferOutputShapeFn)(const OrtCustomOp* op, OrtShapeInferContext* ctx);
  int (*GetStartVersion)(const OrtCustomOp* op);
  int (*GetEndVersion)(const OrtCustomOp* op);
  size_t (*GetMayInplace)(int** input_index, int** output_index);
  void (*ReleaseMayInplace)(int* input_index, int* output_index);
  size_t (*GetAliasMap)(int** input_index, int** output_index);
  void (*ReleaseAliasMap)(int* input_index, int* output_index);
};

}  // extern "C"

// Pin the table layout: a wrong padding count would call the wrong function.
#define OA_SLOT(field, index) static_assert(offsetof(OrtApi, field) == (index) * sizeof(void*), #field)
OA_SLOT(CreateStatus, 0);
OA_SLOT(GetErrorMessage, 2);
OA_SLOT(CreateCustomOpDomain, 26);
OA_SLOT(AddCustomOpDomain, 28);
OA_SLOT(GetTensorMutableData, 51);
OA_SLOT(CastTypeInfoToTensorInfo, 55);
OA_SLOT(GetTensorElementType, 60);
OA_SLOT(GetTensorShapeElementCount, 64);
OA_SLOT(GetTensorTypeAndShape, 65);
OA_SLOT(KernelInfoGetAttribute_int64, 86);
OA_SLOT(KernelContext_GetInputCount, 88);
OA_SLOT(KernelContext_GetOutput, 91);
OA_SLOT(ReleaseStatus, 93);
OA_SLOT(ReleaseTensorTypeAndShapeInfo, 99);
OA_SLOT(KernelContext_GetGPUComputeStream, 193);
OA_SLOT(KernelInfo_GetInputCount, 230);
OA_SLOT(KernelInfo_GetInputTypeInfo, 234);
OA_SLOT(KernelInfo_GetNodeName, 244);
OA_SLOT(KernelContext_ParallelFor, 274);
#undef OA_SLOT
// `version` is padded to pointer size, then 16 callbacks precede CreateKernelV2.
static_assert(offsetof(OrtCustomOp, CreateKernelV2) == 17 * sizeof(void*), "OrtCustomOp layout");
