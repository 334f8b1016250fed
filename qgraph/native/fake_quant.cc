// qgraph's fused fake-quant operators for MXNet (built and registered by qgraph/native.py).
//
// qgraph_fake_quant(x; lower, upper, scale, step, rounding) computes, element by element and in
// float32 exactly as the chain of MXNet scalar operators it replaces:
//     c = min(max(x, lower), upper);  n = round(c / scale);  y = n * step
// with round half away from zero ("half_away", MXNet's round) or half to even ("half_even").
// Its gradient is the straight-through estimator's: dy/dx = 1 where lower <= x <= upper, else 0.
// One pass over the activation forward and one backward, where the operator chain takes six
// and two.
//
// qgraph_fake_quant_online(x, t; levels, signed, min_scale, rounding) is the evaluation form with
// the threshold T = t[0] computed in the graph (from the batch), as its operator chain does it:
//     step = T / levels;  scale = max(step, min_scale);
//     n = round(min(max(x / scale, signed ? -levels : 0), levels));  y = n * step
// Its gradient is zero, as the evaluation chain's (MXNet's round has none); training with batch
// thresholds keeps the operator chain.
//
// qgraph_fake_quant_learned(x, t; levels, signed, rounding) is the training form with a learned
// threshold (LSQ, Esser et al. 2019): s = t[0] / levels, v = min(max(x / s, lo), levels),
// y = round(v) * s; dy/dx = 1 inside the clip range (computed as (g * s) * (1 / s), as the chain's
// elemwise_mul and elemwise_div backward passes do),
// and dL/dt = sum(g * (round(v) - v inside, the clip bound outside)) / levels, summed in double.
// The gradient scale LSQ asks for is applied to t by the graph around it.
//
// qgraph_fake_quant_weight(w; groups, levels, min_scale, rounding) is a weight quantizer's
// evaluation form, as its chain computes it in float32 over w viewed as (groups, -1):
//     scale_g = max(max|w_g| / levels, min_scale);  y = clip(round(w / scale_g), -levels, levels) * scale_g
// Its gradient is zero (the training form wraps it in the straight-through estimator's BlockGrad).
//
// qgraph_fingerprint(a_0, ..., a_{n-1}; num_args) gives, for each float32 input, the sum of its
// elements weighted by a fixed pseudo-random sequence in [0.5, 1.5) (summed in double): the
// evaluation form's test for changed weights, without probe arrays or a BLAS call (whose first
// use costs 5 MB of buffers).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <utility>
#include <unordered_map>
#include <vector>

#include <omp.h>

#include "mxnet/lib_api.h"

using namespace mxnet::ext;

namespace {

// MXNet runs operators on engine threads whose OpenMP default is one thread; its own operators
// ask for OMP_NUM_THREADS (else every processor), and so do these
int thread_count() {
  static const int count = [] {
    const char* text = std::getenv("OMP_NUM_THREADS");
    const int asked = text ? std::atoi(text) : 0;
    return asked > 0 ? asked : omp_get_num_procs();
  }();
  return count;
}

struct Params {
  float lower, upper, scale, step;
  bool half_even;
};

// The named float attributes, parsed as MXNet's scalar operators parse their scalar (a double,
// cast to float32), and the rounding; false (with MXNet's error message set) when one is bad.
bool parse_floats(const std::unordered_map<std::string, std::string>& attrs, const char* op,
                  std::initializer_list<std::pair<const char*, float*>> fields, bool* half_even) {
  for (const auto& field : fields) {
    auto it = attrs.find(field.first);
    if (it == attrs.end()) {
      MX_ERROR_MSG << op << ": attribute '" << field.first << "' is missing";
      return false;
    }
    *field.second = static_cast<float>(std::strtod(it->second.c_str(), nullptr));
  }
  auto rounding = attrs.find("rounding");
  *half_even = rounding != attrs.end() && rounding->second == "half_even";
  if (rounding != attrs.end() && rounding->second != "half_even" && rounding->second != "half_away") {
    MX_ERROR_MSG << op << ": rounding must be half_away or half_even, not " << rounding->second;
    return false;
  }
  return true;
}

bool parse(const std::unordered_map<std::string, std::string>& attrs, Params* p) {
  return parse_floats(attrs, "qgraph_fake_quant",
                      {{"lower", &p->lower}, {"upper", &p->upper}, {"scale", &p->scale}, {"step", &p->step}},
                      &p->half_even);
}

// |v| <= 32767: half away is floor(|v| + 0.49999997) with v's sign (the float32 sum rounds
// |v| = k + 0.5 up to k + 1 and nothing below it); half even adds and subtracts 1.5 * 2^23 as
// the operator chain does, which also gives its +0 (rint would give -0) for v in [-0.5, 0]
inline float round_as(bool half_even, float v) {
  if (half_even) return (v + 12582912.0f) - 12582912.0f;  // not reassociated: no -ffast-math
  return std::copysign(std::floor(std::fabs(v) + 0.49999997f), v);
}

template <bool HalfEven>
void quantize(const float* x, float* y, int64_t n, const Params& p) {
#pragma omp parallel for schedule(static) num_threads(thread_count()) if (n > 32768)
  for (int64_t i = 0; i < n; ++i) {
    float c = x[i] > p.lower ? x[i] : p.lower;
    c = c < p.upper ? c : p.upper;
    y[i] = round_as(HalfEven, c / p.scale) * p.step;
  }
}

MXReturnValue forward(const std::unordered_map<std::string, std::string>& attrs,
                      std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                      const OpResource& res) {
  Params p;
  if (!parse(attrs, &p)) return MX_FAIL;
  MXTensor& x = inputs->at(0);
  if (x.dtype != kFloat32) {
    MX_ERROR_MSG << "qgraph_fake_quant: input must be float32";
    return MX_FAIL;
  }
  if (p.half_even) quantize<true>(x.data<float>(), outputs->at(0).data<float>(), x.size(), p);
  else quantize<false>(x.data<float>(), outputs->at(0).data<float>(), x.size(), p);
  return MX_SUCCESS;
}

// inputs: [output gradient, x, y]; outputs: [x gradient]
MXReturnValue backward(const std::unordered_map<std::string, std::string>& attrs,
                       std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                       const OpResource& res) {
  Params p;
  if (!parse(attrs, &p)) return MX_FAIL;
  const float* grad = inputs->at(0).data<float>();
  const float* x = inputs->at(1).data<float>();
  float* dx = outputs->at(0).data<float>();
  const int64_t n = inputs->at(1).size();
  const float lower = p.lower, upper = p.upper;
#pragma omp parallel for schedule(static) num_threads(thread_count()) if (n > 32768)
  for (int64_t i = 0; i < n; ++i) dx[i] = (x[i] >= lower && x[i] <= upper) ? grad[i] : 0.0f;
  return MX_SUCCESS;
}

// the fake-quant operators' output is shaped and typed as their first input
MXReturnValue infer_type(const std::unordered_map<std::string, std::string>& attrs,
                         std::vector<int>* in_types, std::vector<int>* out_types) {
  out_types->at(0) = in_types->at(0);
  return MX_SUCCESS;
}

MXReturnValue infer_shape(const std::unordered_map<std::string, std::string>& attrs,
                          std::vector<std::vector<unsigned int>>* in_shapes,
                          std::vector<std::vector<unsigned int>>* out_shapes) {
  out_shapes->at(0) = in_shapes->at(0);
  return MX_SUCCESS;
}

struct OnlineParams {
  float levels, min_scale;
  bool is_signed, half_even;
};

bool parse_online(const std::unordered_map<std::string, std::string>& attrs, OnlineParams* p) {
  float is_signed = 0.0f;
  if (!parse_floats(attrs, "qgraph_fake_quant_online",
                    {{"levels", &p->levels}, {"min_scale", &p->min_scale}, {"signed", &is_signed}}, &p->half_even))
    return false;
  p->is_signed = is_signed != 0.0f;
  return true;
}

template <bool HalfEven>
void quantize_online(const float* x, float* y, int64_t n, float lower, float levels, float scale, float step) {
#pragma omp parallel for schedule(static) num_threads(thread_count()) if (n > 32768)
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i] / scale;
    v = v > lower ? v : lower;
    v = v < levels ? v : levels;
    y[i] = round_as(HalfEven, v) * step;
  }
}

// y for a threshold tensor t; `floor_step` keeps the divisor at least min_scale (the online form's
// chain does; a learned threshold is kept above zero by the graph instead)
MXReturnValue quantize_with_threshold(const std::unordered_map<std::string, std::string>& attrs,
                                      std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                                      bool floor_step) {
  OnlineParams p;
  if (!parse_online(attrs, &p)) return MX_FAIL;
  MXTensor& x = inputs->at(0);
  MXTensor& t = inputs->at(1);
  if (x.dtype != kFloat32 || t.dtype != kFloat32 || t.size() != 1) {
    MX_ERROR_MSG << "qgraph fake-quant: needs float32 x and a one-element float32 threshold";
    return MX_FAIL;
  }
  const float step = t.data<float>()[0] / p.levels;
  const float scale = floor_step && step <= p.min_scale ? p.min_scale : step;
  const float lower = p.is_signed ? -p.levels : 0.0f;
  if (p.half_even) quantize_online<true>(x.data<float>(), outputs->at(0).data<float>(), x.size(), lower, p.levels, scale, step);
  else quantize_online<false>(x.data<float>(), outputs->at(0).data<float>(), x.size(), lower, p.levels, scale, step);
  return MX_SUCCESS;
}

MXReturnValue forward_online(const std::unordered_map<std::string, std::string>& attrs,
                             std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                             const OpResource& res) {
  return quantize_with_threshold(attrs, inputs, outputs, true);
}

// inputs: [output gradient, x, t, y]; outputs: [x gradient, t gradient]
MXReturnValue backward_online(const std::unordered_map<std::string, std::string>& attrs,
                              std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                              const OpResource& res) {
  for (MXTensor& gradient : *outputs) {
    float* data = gradient.data<float>();
    std::fill(data, data + gradient.size(), 0.0f);
  }
  return MX_SUCCESS;
}

MXReturnValue forward_learned(const std::unordered_map<std::string, std::string>& attrs,
                              std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                              const OpResource& res) {
  return quantize_with_threshold(attrs, inputs, outputs, false);
}

// inputs: [output gradient, x, t, y]; outputs: [x gradient, t gradient]
MXReturnValue backward_learned(const std::unordered_map<std::string, std::string>& attrs,
                               std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                               const OpResource& res) {
  OnlineParams p;
  if (!parse_online(attrs, &p)) return MX_FAIL;
  const float* grad = inputs->at(0).data<float>();
  const float* in = inputs->at(1).data<float>();
  const float step = inputs->at(2).data<float>()[0] / p.levels;
  float* dx = outputs->at(0).data<float>();
  const int64_t n = inputs->at(1).size();
  const float lower = p.is_signed ? -p.levels : 0.0f, upper = p.levels;
  const bool half_even = p.half_even;
  const float reciprocal = 1.0f / step;
  double step_gradient = 0.0;
#pragma omp parallel for schedule(static) num_threads(thread_count()) reduction(+ : step_gradient) if (n > 32768)
  for (int64_t i = 0; i < n; ++i) {
    const float raw = in[i] / step;
    const bool inside = raw >= lower && raw <= upper;
    float v = raw > lower ? raw : lower;
    v = v < upper ? v : upper;
    const float r = round_as(half_even, v);
    dx[i] = inside ? (grad[i] * step) * reciprocal : 0.0f;
    step_gradient += static_cast<double>(grad[i]) * (inside ? static_cast<double>(r) - raw : r);
  }
  outputs->at(1).data<float>()[0] = static_cast<float>(step_gradient / p.levels);
  return MX_SUCCESS;
}

struct WeightParams {
  float levels, min_scale;
  int64_t groups;
  bool half_even;
};

bool parse_weight(const std::unordered_map<std::string, std::string>& attrs, WeightParams* p) {
  float groups = 0.0f;
  if (!parse_floats(attrs, "qgraph_fake_quant_weight",
                    {{"groups", &groups}, {"levels", &p->levels}, {"min_scale", &p->min_scale}}, &p->half_even))
    return false;
  p->groups = static_cast<int64_t>(groups);
  if (p->groups < 1 || static_cast<float>(p->groups) != groups || !(p->levels >= 1.0f)) {
    MX_ERROR_MSG << "qgraph_fake_quant_weight: groups must be a positive integer and levels at least 1";
    return false;
  }
  return true;
}

template <bool HalfEven>
void quantize_weight(const float* w, float* y, int64_t groups, int64_t size, const WeightParams& p) {
#pragma omp parallel for schedule(static) num_threads(thread_count()) if (groups * size > 65536 && groups > 1)
  for (int64_t g = 0; g < groups; ++g) {
    const float* in = w + g * size;
    float* out = y + g * size;
    // NaN propagates as through MXNet's max, _maximum_scalar and clip: a diverged weight's
    // whole group comes out NaN (and an infinite one's: inf / inf, 0 * inf), never hidden
    float magnitude = 0.0f;
    for (int64_t i = 0; i < size && !std::isnan(magnitude); ++i) {
      const float a = std::fabs(in[i]);
      if (a > magnitude || std::isnan(a)) magnitude = a;
    }
    const float step = magnitude / p.levels;
    const float scale = (step > p.min_scale || std::isnan(step)) ? step : p.min_scale;
    for (int64_t i = 0; i < size; ++i) {
      float n = round_as(HalfEven, in[i] / scale);
      n = n > p.levels ? p.levels : (n < -p.levels ? -p.levels : n);
      out[i] = n * scale;
    }
  }
}

MXReturnValue forward_weight(const std::unordered_map<std::string, std::string>& attrs,
                             std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                             const OpResource& res) {
  WeightParams p;
  if (!parse_weight(attrs, &p)) return MX_FAIL;
  MXTensor& w = inputs->at(0);
  if (w.dtype != kFloat32 || w.size() % p.groups != 0) {
    MX_ERROR_MSG << "qgraph_fake_quant_weight: needs a float32 weight whose size divides into " << p.groups
                 << " groups";
    return MX_FAIL;
  }
  const int64_t size = w.size() / p.groups;
  if (p.half_even) quantize_weight<true>(w.data<float>(), outputs->at(0).data<float>(), p.groups, size, p);
  else quantize_weight<false>(w.data<float>(), outputs->at(0).data<float>(), p.groups, size, p);
  return MX_SUCCESS;
}

// inputs: [output gradient, w, y]; outputs: [w gradient]
MXReturnValue backward_weight(const std::unordered_map<std::string, std::string>& attrs,
                              std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                              const OpResource& res) {
  float* data = outputs->at(0).data<float>();
  std::fill(data, data + outputs->at(0).size(), 0.0f);
  return MX_SUCCESS;
}

// ParseAttrs of a fake-quant operator: its attributes parse, `Inputs` inputs, one output
template <typename P, bool (*Parse)(const std::unordered_map<std::string, std::string>&, P*), int Inputs>
MXReturnValue parse_attrs_of(const std::unordered_map<std::string, std::string>& attrs, int* num_in, int* num_out) {
  P p;
  if (!Parse(attrs, &p)) return MX_FAIL;
  *num_in = Inputs;
  *num_out = 1;
  return MX_SUCCESS;
}

inline double probe(uint64_t index) {  // splitmix64 of the index, as a weight in [0.5, 1.5)
  uint64_t z = index + 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return 0.5 + static_cast<double>(z >> 11) * (1.0 / 9007199254740992.0);
}

int argument_count(const std::unordered_map<std::string, std::string>& attrs) {
  auto it = attrs.find("num_args");
  return it == attrs.end() ? 0 : std::atoi(it->second.c_str());
}

MXReturnValue forward_fingerprint(const std::unordered_map<std::string, std::string>& attrs,
                                  std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                                  const OpResource& res) {
  float* out = outputs->at(0).data<float>();
  for (size_t k = 0; k < inputs->size(); ++k) {
    MXTensor& a = inputs->at(k);
    if (a.dtype != kFloat32) {
      MX_ERROR_MSG << "qgraph_fingerprint: input " << k << " is not float32";
      return MX_FAIL;
    }
    const float* data = a.data<float>();
    const int64_t n = a.size();
    double total = 0.0;
#pragma omp parallel for schedule(static) num_threads(thread_count()) reduction(+ : total) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) total += static_cast<double>(data[i]) * probe(static_cast<uint64_t>(i));
    out[k] = static_cast<float>(total);
  }
  return MX_SUCCESS;
}

MXReturnValue parse_attrs_fingerprint(const std::unordered_map<std::string, std::string>& attrs, int* num_in,
                                      int* num_out) {
  const int count = argument_count(attrs);
  if (count <= 0) {
    MX_ERROR_MSG << "qgraph_fingerprint: num_args must be a positive integer";
    return MX_FAIL;
  }
  *num_in = count;
  *num_out = 1;
  return MX_SUCCESS;
}

MXReturnValue infer_type_fingerprint(const std::unordered_map<std::string, std::string>& attrs,
                                     std::vector<int>* in_types, std::vector<int>* out_types) {
  out_types->at(0) = kFloat32;
  return MX_SUCCESS;
}

MXReturnValue infer_shape_fingerprint(const std::unordered_map<std::string, std::string>& attrs,
                                      std::vector<std::vector<unsigned int>>* in_shapes,
                                      std::vector<std::vector<unsigned int>>* out_shapes) {
  out_shapes->at(0) = {static_cast<unsigned int>(argument_count(attrs))};
  return MX_SUCCESS;
}

}  // namespace

REGISTER_OP(qgraph_fingerprint)
    .setParseAttrs(parse_attrs_fingerprint)
    .setInferType(infer_type_fingerprint)
    .setInferShape(infer_shape_fingerprint)
    .setForward(forward_fingerprint, "cpu");

REGISTER_OP(qgraph_fake_quant_weight)
    .setParseAttrs(parse_attrs_of<WeightParams, parse_weight, 1>)
    .setInferType(infer_type)
    .setInferShape(infer_shape)
    .setForward(forward_weight, "cpu")
    .setBackward(backward_weight, "cpu");

REGISTER_OP(qgraph_fake_quant_learned)
    .setParseAttrs(parse_attrs_of<OnlineParams, parse_online, 2>)
    .setInferType(infer_type)
    .setInferShape(infer_shape)
    .setForward(forward_learned, "cpu")
    .setBackward(backward_learned, "cpu");

REGISTER_OP(qgraph_fake_quant_online)
    .setParseAttrs(parse_attrs_of<OnlineParams, parse_online, 2>)
    .setInferType(infer_type)
    .setInferShape(infer_shape)
    .setForward(forward_online, "cpu")
    .setBackward(backward_online, "cpu");

REGISTER_OP(qgraph_fake_quant)
    .setParseAttrs(parse_attrs_of<Params, parse, 1>)
    .setInferType(infer_type)
    .setInferShape(infer_shape)
    .setForward(forward, "cpu")
    .setBackward(backward, "cpu");

MXReturnValue initialize(int version) {
  return version >= 10900 ? MX_SUCCESS : MX_FAIL;
}
