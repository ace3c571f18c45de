#include "worker/request_rules.h"

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "worker/wan_config.h"

namespace dn::worker {

namespace {

absl::Status Invalid(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

const char* FieldName(SizeField f) {
  return f == SizeField::kPixelSize ? "pixel_size" : "latent_shape";
}

// Shapes in messages are bounded: a client may send thousands of dims.
std::string BoundedShape(const Shape& shape) {
  constexpr size_t kShown = 6;
  if (shape.size() <= kShown) return ShapeString(shape);
  Shape head(shape.begin(), shape.begin() + kShown);
  std::string s = ShapeString(head);
  s.pop_back();
  return absl::StrCat(s, ", ... (", shape.size(), " dims)]");
}

}  // namespace

ModelGeometry GeometryOf(const WanConfig& config, int64_t max_tokens) {
  ModelGeometry g;
  g.in_channels = config.in_channels;
  g.out_channels = config.out_channels;
  g.text_dim = config.text_dim;
  g.image_dim = config.is_i2v() ? config.image_dim : 0;
  g.experts = config.num_experts();
  g.first_frame_condition = config.is_ti2v();
  g.vae_stride = config.vae_stride;
  g.patch_size = config.patch_size;
  g.max_tokens = max_tokens;
  g.max_axis_tokens = config.rope_max_seq_len;
  return g;
}

RequestRules::RequestRules(const ModelGeometry& model) : model_(model) {}

int RequestRules::Patch(int axis) const {
  return std::max(1, model_.patch_size[static_cast<size_t>(axis)]);
}
int RequestRules::StateChannels() const {
  return model_.out_channels > 0 ? model_.out_channels : model_.in_channels;
}
int RequestRules::Stride(int axis) const {
  return std::max(1, model_.vae_stride[static_cast<size_t>(axis)]);
}

absl::StatusOr<LatentShape> RequestRules::LatentFromPixels(
    const PixelSize& pixels) const {
  const int st = Stride(0), sh = Stride(1), sw = Stride(2);
  if (pixels.frames < 1 || (pixels.frames - 1) % st != 0)
    return Invalid("pixel_size.frames",
                   absl::StrCat(pixels.frames, " is not 1 + a multiple of ", st,
                                " (the model's temporal VAE stride; e.g. 1, ",
                                1 + st, ", ", 1 + 4 * st, ")"));
  if (pixels.height < 1 || pixels.height % sh != 0)
    return Invalid("pixel_size.height",
                   absl::StrCat(pixels.height, " is not a positive multiple of ",
                                sh, " (the model's VAE stride)"));
  if (pixels.width < 1 || pixels.width % sw != 0)
    return Invalid("pixel_size.width",
                   absl::StrCat(pixels.width, " is not a positive multiple of ",
                                sw, " (the model's VAE stride)"));
  LatentShape l;
  l.channels = model_.in_channels;
  l.frames = (pixels.frames - 1) / st + 1;
  l.height = pixels.height / sh;
  l.width = pixels.width / sw;
  return l;
}

int64_t RequestRules::Tokens(const LatentShape& l) const {
  // Each factor is < 2^31, so the product of three can overflow int64:
  // saturate, and the max_tokens check refuses it.
  const int64_t ft = int64_t{l.frames / Patch(0)} * (l.height / Patch(1));
  int64_t tokens = 0;
  if (__builtin_mul_overflow(ft, int64_t{l.width / Patch(2)}, &tokens))
    return std::numeric_limits<int64_t>::max();
  return tokens;
}

absl::StatusOr<LatentShape> RequestRules::CheckLatent(LatentShape l,
                                                      SizeField field) const {
  const std::string name = FieldName(field);
  const bool pixels = field == SizeField::kPixelSize;
  if (l.channels == 0) l.channels = model_.in_channels;
  if (l.channels != model_.in_channels)
    return Invalid(absl::StrCat(name, ".channels"),
                   absl::StrCat(l.channels, " != the model's ",
                                model_.in_channels, " input channels"));
  const int dims[3] = {l.frames, l.height, l.width};
  const char* axes[3] = {"frames", "height", "width"};
  for (int i = 0; i < 3; ++i) {
    const std::string f = absl::StrCat(name, ".", axes[i]);
    if (dims[i] < 1 || dims[i] % Patch(i) != 0)
      return Invalid(f, absl::StrCat("latent ", axes[i], " ", dims[i],
                                     " is not a positive multiple of the patch size ",
                                     Patch(i),
                                     pixels ? " (pixel size / VAE stride)" : ""));
    if (model_.max_axis_tokens > 0 && dims[i] / Patch(i) > model_.max_axis_tokens)
      return Invalid(f, absl::StrCat("latent ", axes[i], " ", dims[i], " is ",
                                     dims[i] / Patch(i),
                                     " tokens along the axis; the model has positions for ",
                                     model_.max_axis_tokens));
  }
  const int64_t tokens = Tokens(l);
  if (model_.max_tokens > 0 && tokens > model_.max_tokens)
    return Invalid(name, absl::StrCat("latent [", l.channels, ", ", l.frames, ", ",
                                      l.height, ", ", l.width, "] is ", tokens,
                                      " tokens; the model serves at most ",
                                      model_.max_tokens, " (max_tokens)"));
  return l;
}

absl::StatusOr<Sampling> RequestRules::ResolveSampling(
    std::optional<int> steps, double guidance, double shift,
    SchedulerKind scheduler) const {
  Sampling s;
  s.steps = steps.has_value() ? *steps : kDefaultSteps;
  // 0 means the default only for guidance and shift; a bad value is checked
  // as given (so the message shows it).
  s.guidance = guidance == 0 ? kDefaultGuidance : guidance;
  s.shift = shift == 0 ? kDefaultShift : shift;
  s.scheduler = scheduler;
  if (absl::Status st = CheckSampling(s); !st.ok()) return st;
  return s;
}

absl::Status RequestRules::CheckSampling(const Sampling& s) const {
  if (s.steps < 1 || s.steps > kMaxSteps)
    return Invalid("steps", absl::StrCat("must be in [1, ", kMaxSteps, "], got ",
                                         s.steps));
  if (!std::isfinite(s.guidance) || s.guidance < 0 || s.guidance > kMaxGuidance)
    return Invalid("guidance_scale",
                   absl::StrCat("must be finite and in [0, ", kMaxGuidance,
                                "] (CFG on iff > 1), got ", s.guidance));
  if (!std::isfinite(s.shift) || s.shift <= 0 || s.shift > kMaxShift)
    return Invalid("shift", absl::StrCat("must be finite and in (0, ", kMaxShift,
                                         "] (0: the default), got ", s.shift));
  // The schedule itself: the sampler computes it exactly as it will run.
  absl::StatusOr<std::unique_ptr<Sampler>> sampler =
      Sampler::Create(s.scheduler, s.steps, s.shift);
  if (!sampler.ok())
    return Invalid("shift", absl::StrCat(s.shift, " with ", s.steps, " ",
                                         SchedulerName(s.scheduler),
                                         " steps gives a degenerate schedule (",
                                         sampler.status().message(), ")"));
  const std::vector<double>& sigmas = (*sampler)->sigmas();
  const std::vector<double>& ts = (*sampler)->timesteps();
  for (size_t i = 0; i + 1 < sigmas.size(); ++i) {
    const bool bad = !std::isfinite(sigmas[i]) || !(sigmas[i] > 0) ||
                     sigmas[i] > 1 || !std::isfinite(ts[i]) ||
                     (i > 0 && sigmas[i] > sigmas[i - 1]);
    if (bad)
      return Invalid("shift", absl::StrCat(s.shift, " with ", s.steps, " ",
                                           SchedulerName(s.scheduler),
                                           " steps gives a degenerate schedule: sigma_",
                                           i, " = ", sigmas[i],
                                           " (sigmas must be finite, in (0, 1] "
                                           "and decreasing); use a shift nearer 1..10"));
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> RequestRules::CheckEmbedsShape(absl::string_view field,
                                                       const Shape& s) const {
  const bool rank2 = s.size() == 2;
  const bool rank3 = s.size() == 3 && s[0] == 1;
  if (!(rank2 || rank3) || s.back() != model_.text_dim || s[s.size() - 2] < 1)
    return Invalid(absl::StrCat(field, ".shape"),
                   absl::StrCat("expected [T, ", model_.text_dim, "] or [1, T, ",
                                model_.text_dim, "] with T >= 1, got ",
                                BoundedShape(s)));
  const int64_t t = s[s.size() - 2];
  if (t > kMaxTextTokens)
    return Invalid(absl::StrCat(field, ".shape"),
                   absl::StrCat("T = ", t, " text tokens is more than ",
                                kMaxTextTokens));
  return t;
}

absl::Status RequestRules::CheckLatentsShape(absl::string_view field,
                                             const Shape& s,
                                             const LatentShape& l) const {
  const Shape want = {StateChannels(), l.frames, l.height, l.width};
  if (s != want)
    return Invalid(absl::StrCat(field, ".shape"),
                   absl::StrCat("expected the latent shape ", ShapeString(want),
                                ", got ", BoundedShape(s)));
  return absl::OkStatus();
}

absl::Status RequestRules::CheckConditionShape(absl::string_view field,
                                               const Shape& s,
                                               const LatentShape& l) const {
  if (model_.first_frame_condition) {
    // TI2V: the normalised VAE latent of the conditioning image = frame 0.
    const Shape want = {StateChannels(), 1, l.height, l.width};
    if (s != want)
      return Invalid(absl::StrCat(field, ".shape"),
                     absl::StrCat("expected ", ShapeString(want),
                                  " (the image latent of frame 0: out_channels ",
                                  StateChannels(), ", 1 frame, the latent's H, W), got ",
                                  BoundedShape(s)));
    return absl::OkStatus();
  }
  const int cond = model_.in_channels - StateChannels();
  if (cond <= 0)
    return Invalid(field, absl::StrCat("this model takes no condition (in_channels ",
                                       model_.in_channels, " = out_channels)"));
  const Shape want = {cond, l.frames, l.height, l.width};
  if (s != want)
    return Invalid(absl::StrCat(field, ".shape"),
                   absl::StrCat("expected ", ShapeString(want), " (in_channels ",
                                model_.in_channels, " - out_channels ", StateChannels(),
                                ", then the latent's F, H, W), got ", BoundedShape(s)));
  return absl::OkStatus();
}

absl::StatusOr<int64_t> RequestRules::CheckImageEmbedsShape(absl::string_view field,
                                                            const Shape& s) const {
  if (model_.image_dim <= 0)
    return Invalid(field, "this model has no image branch (a t2v or Wan2.2 model)");
  const bool rank2 = s.size() == 2;
  const bool rank3 = s.size() == 3 && s[0] == 1;
  const int64_t n = rank2 || rank3 ? s[s.size() - 2] : 0;
  if (!(rank2 || rank3) || s.back() != model_.image_dim || n < 1 || n > kMaxImageTokens)
    return Invalid(absl::StrCat(field, ".shape"),
                   absl::StrCat("expected [N, ", model_.image_dim, "] or [1, N, ",
                                model_.image_dim, "] with 1 <= N <= ", kMaxImageTokens,
                                ", got ", BoundedShape(s)));
  return n;
}

absl::Status RequestRules::CheckConditioningPresent(bool has_image_embeds,
                                                    bool has_condition_latents) const {
  if (model_.image_dim > 0 && !has_image_embeds)
    return Invalid("image_embeds",
                   absl::StrCat("required: the model has an image branch (CLIP image "
                                "tokens [N, ", model_.image_dim, "], 257 for Wan2.1 I2V)"));
  const int cond = model_.in_channels - StateChannels();
  if (cond > 0 && !has_condition_latents)
    return Invalid("condition_latents",
                   absl::StrCat("required: the model takes ", model_.in_channels,
                                " input channels = ", StateChannels(), " of the latent + ",
                                cond, " of condition (I2V: mask 4 | image latent 16)"));
  return absl::OkStatus();
}

absl::Status RequestRules::CheckGuidance2(double g) const {
  if (model_.experts < 2)
    return Invalid("guidance_scale_2",
                   "is for two-expert models (Wan2.2 A14B); this model has one transformer");
  if (!std::isfinite(g) || g < 0 || g > kMaxGuidance)
    return Invalid("guidance_scale_2", absl::StrCat("must be finite and in [0, ",
                                                    kMaxGuidance, "], got ", g));
  return absl::OkStatus();
}

absl::Status RequestRules::CheckAcceleration(const Acceleration& a) {
  const double t = a.cache_threshold;
  if (!std::isfinite(t) || t < 0 || t > kMaxCacheThreshold)
    return Invalid("acceleration.cache_threshold",
                   absl::StrCat("must be finite and in [0, ", kMaxCacheThreshold,
                                "] (0 = every step computed), got ", t));
  return absl::OkStatus();
}

absl::Status RequestRules::CheckLoraCount(size_t count) const {
  if (count > kMaxLorasPerRequest)
    return Invalid("lora", absl::StrCat(count, " LoRAs, at most ", kMaxLorasPerRequest));
  return absl::OkStatus();
}

absl::Status RequestRules::CheckLora(int index, absl::string_view name, double scale,
                                     int expert) const {
  const std::string f = absl::StrCat("lora[", index, "]");
  if (name.empty() || name.size() > kMaxLoraNameLength ||
      name.find('/') != absl::string_view::npos || name == "." || name == ".." ||
      name.find('\0') != absl::string_view::npos)
    return Invalid(f + ".name", absl::StrCat("must be a LoRA file name (ModelInfo.loras), at most ",
                                             kMaxLoraNameLength, " bytes without '/'"));
  if (!std::isfinite(scale) || std::abs(scale) > kMaxLoraScale)
    return Invalid(f + ".scale", absl::StrCat("must be finite with |scale| <= ", kMaxLoraScale,
                                              ", got ", scale));
  const int max_expert = model_.experts >= 2 ? 2 : 0;
  if (expert < 0 || expert > max_expert)
    return Invalid(f + ".expert",
                   absl::StrCat("must be 0 (all)",
                                model_.experts >= 2 ? ", 1 (high-noise) or 2 (low-noise)"
                                                    : " for a one-transformer model",
                                ", got ", expert));
  return absl::OkStatus();
}

absl::Status RequestRules::ValueError(absl::string_view field, int64_t index,
                                      float v) {
  if (!std::isfinite(v))
    return Invalid(absl::StrCat(field, ".data"),
                   absl::StrCat("element ", index, " is ",
                                std::isnan(v) ? "NaN" : "Inf",
                                " (values must be finite)"));
  return Invalid(absl::StrCat(field, ".data"),
                 absl::StrCat("element ", index, " is ", v,
                              "; |values| must be at most ", kMaxInputMagnitude,
                              " (larger ones overflow in the model)"));
}

absl::Status RequestRules::CheckValues(absl::string_view field, const float* v,
                                       int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (absl::Status s = CheckValue(field, i, v[i]); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status RequestRules::NonFiniteOutputError(int64_t bad, int64_t total,
                                                absl::string_view likely_field,
                                                double likely_max_abs) {
  return Invalid(likely_field,
                 absl::StrCat("the output latents are not finite (", bad, " of ",
                              total, " values are NaN or Inf); the likely cause is ",
                              likely_field, " (largest |value| ", likely_max_abs,
                              "): scale the inputs down, or use a smaller "
                              "guidance_scale or a shift nearer 1..10"));
}

double MaxAbs(const float* v, int64_t n) {
  double m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double a = std::fabs(static_cast<double>(v[i]));
    if (std::isnan(a)) return a;
    if (a > m) m = a;
  }
  return m;
}

}  // namespace dn::worker
