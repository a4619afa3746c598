#include "checkpoints/interop.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>
#include <utility>
#include <vector>

#include "config/loader.h"
#include "data/data_state.h"
#include "model/param_roles.h"

namespace moetrain::checkpoints {
namespace fs = std::filesystem;
namespace {

struct Named {
  std::string name;
  at::Tensor tensor;
};

// How our global names (model/<name> in a checkpoint) and transformers' correspond, declared once for both
// directions. kSame: one tensor each; kFuseExperts: ours {w_gate, w_up} [E, inter, d] are transformers' gate_up_proj
// [E, 2·inter, d]; kSwapHalves: our MTP projection's input is [hnorm(h); enorm(e)], the released eh_proj's
// [enorm(e); hnorm(h)]; kCopy: transformers' MTP layers repeat the embedding and the head (written, not read back).
enum class Link { kSame, kFuseExperts, kSwapHalves, kCopy };
struct Correspondence {
  std::vector<std::string> ours;
  std::string hf;
  Link link = Link::kSame;
};

void block_links(const std::string& ours, const std::string& hf, const config::ModelConfig& m, bool moe,
                 std::vector<Correspondence>& out) {
  auto same = [&](const std::string& a, const std::string& b) { out.push_back({{ours + a}, hf + b, Link::kSame}); };
  same("attn_norm.weight", "input_layernorm.weight");
  if (m.q_lora_rank > 0) {
    same("attn.wq_a", "self_attn.q_a_proj.weight");
    same("attn.q_norm.weight", "self_attn.q_a_layernorm.weight");
    same("attn.wq_b", "self_attn.q_b_proj.weight");
  } else {
    same("attn.wq", "self_attn.q_proj.weight");
  }
  same("attn.wkv_a", "self_attn.kv_a_proj_with_mqa.weight");
  same("attn.kv_norm.weight", "self_attn.kv_a_layernorm.weight");
  same("attn.wkv_b", "self_attn.kv_b_proj.weight");
  same("attn.wo", "self_attn.o_proj.weight");
  same("ffn_norm.weight", "post_attention_layernorm.weight");
  if (!moe) {
    same("mlp.w_gate", "mlp.gate_proj.weight");
    same("mlp.w_up", "mlp.up_proj.weight");
    same("mlp.w_down", "mlp.down_proj.weight");
    return;
  }
  same("moe.router.weight", "mlp.gate.weight");
  same("moe.router.bias", "mlp.gate.e_score_correction_bias");
  out.push_back(
      {{ours + "moe.experts.w_gate", ours + "moe.experts.w_up"}, hf + "mlp.experts.gate_up_proj", Link::kFuseExperts});
  same("moe.experts.w_down", "mlp.experts.down_proj");
  if (m.n_shared_experts > 0) {
    same("moe.shared.w_gate", "mlp.shared_experts.gate_proj.weight");
    same("moe.shared.w_up", "mlp.shared_experts.up_proj.weight");
    same("moe.shared.w_down", "mlp.shared_experts.down_proj.weight");
  }
}

std::vector<Correspondence> links(const config::ModelConfig& m) {
  std::vector<Correspondence> out;
  out.push_back({{"embed.weight"}, "model.embed_tokens.weight"});
  for (int64_t l = 0; l < m.num_layers; ++l)
    block_links(fmt::format("layers.{}.", l), fmt::format("model.layers.{}.", l), m, l >= m.n_dense_layers, out);
  out.push_back({{"norm.weight"}, "model.norm.weight"});
  const std::string head = m.tie_embeddings ? "embed.weight" : "head.weight";
  if (!m.tie_embeddings) out.push_back({{head}, "lm_head.weight"});
  for (int64_t k = 0; k < m.mtp_depth; ++k) {
    const std::string ours = fmt::format("mtp.{}.", k), hf = fmt::format("model.layers.{}.", m.num_layers + k);
    out.push_back({{ours + "proj"}, hf + "eh_proj.weight", Link::kSwapHalves});
    out.push_back({{ours + "enorm.weight"}, hf + "enorm.weight"});
    out.push_back({{ours + "hnorm.weight"}, hf + "hnorm.weight"});
    out.push_back({{"embed.weight"}, hf + "embed_tokens.weight", Link::kCopy});
    out.push_back({{ours + "norm.weight"}, hf + "shared_head.norm.weight"});
    out.push_back({{head}, hf + "shared_head.head.weight", Link::kCopy});
    block_links(ours + "block.", hf, m, m.n_dense_layers < m.num_layers, out);
  }
  return out;
}

at::Tensor swap_halves(const at::Tensor& t) {
  const int64_t half = t.size(1) / 2;
  return at::cat({t.narrow(1, half, half), t.narrow(1, 0, half)}, 1);
}

nlohmann::json hf_config(const config::Config& c, at::ScalarType dtype) {
  const config::ModelConfig& m = c.model;
  nlohmann::json j;
  j["architectures"] = {"DeepseekV3ForCausalLM"};
  j["model_type"] = "deepseek_v3";
  j["vocab_size"] = m.vocab_size;
  j["hidden_size"] = m.hidden_size;
  j["intermediate_size"] = m.dense_inter_dim;
  j["moe_intermediate_size"] = m.moe_inter_dim;
  j["num_hidden_layers"] = m.num_layers;
  j["num_attention_heads"] = m.num_heads;
  j["num_key_value_heads"] = m.num_heads;
  j["n_shared_experts"] = m.n_shared_experts;
  j["n_routed_experts"] = m.n_routed_experts;
  j["routed_scaling_factor"] = m.routed_scaling_factor;
  j["kv_lora_rank"] = m.kv_lora_rank;
  j["q_lora_rank"] = m.q_lora_rank > 0 ? nlohmann::json(m.q_lora_rank) : nlohmann::json(nullptr);
  j["qk_rope_head_dim"] = m.qk_rope_head_dim;
  j["qk_nope_head_dim"] = m.qk_nope_head_dim;
  j["v_head_dim"] = m.v_head_dim;
  j["n_group"] = m.n_group;
  j["topk_group"] = m.topk_group;
  j["num_experts_per_tok"] = m.top_k;
  j["first_k_dense_replace"] = m.n_dense_layers;
  j["norm_topk_prob"] = true;
  j["scoring_func"] = "sigmoid";
  j["topk_method"] = "noaux_tc";
  j["hidden_act"] = "silu";
  j["max_position_embeddings"] = c.train.seq_len;
  j["initializer_range"] = m.init_std;
  j["rms_norm_eps"] = m.norm_eps;
  j["rope_theta"] = m.rope_theta;
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", m.rope_theta}};
  j["rope_interleave"] = true;
  j["tie_word_embeddings"] = m.tie_embeddings;
  j["attention_bias"] = false;
  j["attention_dropout"] = 0.0;
  j["num_nextn_predict_layers"] = m.mtp_depth;
  j["dtype"] = dtype == at::kBFloat16 ? "bfloat16" : "float32";
  j["use_cache"] = true;
  return j;
}

const char* safetensors_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "F32";
    case at::kBFloat16:
      return "BF16";
    default:
      throw std::logic_error("safetensors_dtype: unexpected dtype");
  }
}

// One safetensors file: an 8-byte little-endian header length, the JSON header (padded to 8 bytes), the data.
void write_safetensors(const fs::path& path, const std::vector<Named>& tensors) {
  nlohmann::ordered_json header;
  header["__metadata__"] = {{"format", "pt"}};
  uint64_t offset = 0;
  for (const Named& t : tensors) {
    const uint64_t bytes = static_cast<uint64_t>(t.tensor.numel()) * t.tensor.element_size();
    header[t.name] = {{"dtype", safetensors_dtype(t.tensor.scalar_type())},
                      {"shape", t.tensor.sizes().vec()},
                      {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::ofstream f(path, std::ios::binary);
  const uint64_t n = text.size();
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
  f.write(reinterpret_cast<const char*>(len), 8);
  f.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const Named& t : tensors) {
    const at::Tensor c = t.tensor.contiguous();
    f.write(static_cast<const char*>(c.const_data_ptr()), static_cast<std::streamsize>(c.numel() * c.element_size()));
  }
  f.close();
  if (!f) throw std::runtime_error(fmt::format("{}: cannot write", path.string()));
}

// Every tensor of a safetensors folder (one file, or the shards its index names), as FP32.
std::map<std::string, at::Tensor> read_safetensors(const fs::path& dir) {
  std::vector<fs::path> files;
  if (fs::exists(dir / "model.safetensors.index.json")) {
    std::set<std::string> names;
    const nlohmann::json index = nlohmann::json::parse(std::ifstream(dir / "model.safetensors.index.json"));
    for (const auto& [tensor, file] : index.at("weight_map").items()) names.insert(file.get<std::string>());
    for (const std::string& f : names) files.push_back(dir / f);
  } else if (fs::exists(dir / "model.safetensors")) {
    files.push_back(dir / "model.safetensors");
  } else {
    throw std::runtime_error(
        fmt::format("{}: neither model.safetensors nor model.safetensors.index.json", dir.string()));
  }
  std::map<std::string, at::Tensor> out;
  for (const fs::path& path : files) {
    std::ifstream f(path, std::ios::binary);
    unsigned char len[8] = {};
    f.read(reinterpret_cast<char*>(len), 8);
    uint64_t n = 0;
    for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(len[i]) << (8 * i);
    if (!f || n > (uint64_t{1} << 30))
      throw std::runtime_error(fmt::format("{}: not a safetensors file (header length)", path.string()));
    std::string text(n, '\0');
    f.read(text.data(), static_cast<std::streamsize>(n));
    const nlohmann::json header = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (!f || header.is_discarded() || !header.is_object())
      throw std::runtime_error(fmt::format("{}: not a safetensors file (header)", path.string()));
    const auto data_start = static_cast<std::streamoff>(8 + n);
    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") continue;
      const std::string dt = entry.at("dtype").get<std::string>();
      const at::ScalarType type =
          dt == "F32"    ? at::kFloat
          : dt == "BF16" ? at::kBFloat16
          : dt == "F16"  ? at::kHalf
                        : throw std::runtime_error(fmt::format("{}: tensor {} has dtype {} (F32, BF16 or F16 expected)",
                                                               path.string(), name, dt));
      const std::vector<int64_t> shape = entry.at("shape").get<std::vector<int64_t>>();
      const auto begin = entry.at("data_offsets").at(0).get<int64_t>(),
                 end = entry.at("data_offsets").at(1).get<int64_t>();
      at::Tensor t = at::empty(shape, at::TensorOptions().dtype(type));
      if (end - begin != static_cast<int64_t>(t.nbytes()))
        throw std::runtime_error(fmt::format("{}: tensor {}: {} bytes for shape {}", path.string(), name, end - begin,
                                             nlohmann::json(shape).dump()));
      f.seekg(data_start + begin);
      f.read(static_cast<char*>(t.data_ptr()), end - begin);
      if (!f) throw std::runtime_error(fmt::format("{}: tensor {} is cut short", path.string(), name));
      out[name] = t.to(at::kFloat);
    }
  }
  return out;
}

}  // namespace

config::Config saved_config(const Checkpoint& ck) {
  const fs::path tmp = fs::temp_directory_path() / fmt::format("moetrain-config-{}.yaml", ::getpid());
  {
    std::ofstream f(tmp);
    f << ck.meta().at("config").get<std::string>();
  }
  try {
    config::Config c = config::load_config(tmp.string());
    fs::remove(tmp);
    return c;
  } catch (const std::exception& e) {
    std::error_code ec;
    fs::remove(tmp, ec);
    throw std::runtime_error(fmt::format("{}: the config saved in it does not load: {}", ck.index_file(), e.what()));
  }
}

std::string hf_unsupported(const config::ModelConfig& m) {
  if (m.norm_eps != 1e-6)
    return fmt::format(
        "model.norm_eps is {}: transformers' DeepseekV3 fixes the q and kv latent norms' epsilon at "
        "1e-6",
        m.norm_eps);
  return "";
}

std::string export_hf(const std::string& dir, const std::string& out, at::ScalarType dtype, int64_t shard_bytes) {
  Checkpoint ck(dir);
  const config::Config c = saved_config(ck);
  const config::ModelConfig& m = c.model;
  if (const std::string why = hf_unsupported(m); !why.empty())
    throw std::runtime_error(fmt::format("{}: cannot export to transformers: {}", dir, why));
  const fs::path target(out);
  if (fs::exists(target) && (!fs::is_directory(target) || !fs::is_empty(target)))
    throw std::runtime_error(fmt::format("{}: exists and is not an empty directory; --out names a new folder", out));
  if (within(target, dir))
    throw std::runtime_error(fmt::format("{}: inside the checkpoint {}; write the export outside it", out, dir));

  std::vector<Named> tensors;
  for (const Correspondence& c : links(m)) {
    std::vector<at::Tensor> ours;
    for (const std::string& name : c.ours) ours.push_back(ck.read("model/" + name));
    at::Tensor t = c.link == Link::kFuseExperts  ? at::cat(ours, 1)
                   : c.link == Link::kSwapHalves ? swap_halves(ours[0])
                                                 : ours[0];
    tensors.push_back({c.hf, t});
  }
  for (Named& t : tensors)
    if (t.name.find("e_score_correction_bias") == std::string::npos) t.tensor = t.tensor.to(dtype);

  // Files of at most shard_bytes each (a tensor larger than that alone in its file), in order.
  std::vector<std::vector<Named>> files(1);
  int64_t in_file = 0, total = 0;
  for (Named& t : tensors) {
    const int64_t bytes = t.tensor.numel() * static_cast<int64_t>(t.tensor.element_size());
    if (in_file > 0 && in_file + bytes > shard_bytes) files.emplace_back(), in_file = 0;
    files.back().push_back(std::move(t));
    in_file += bytes;
    total += bytes;
  }
  fs::create_directories(target);
  nlohmann::ordered_json weight_map;
  for (size_t i = 0; i < files.size(); ++i) {
    const std::string name = files.size() == 1 ? "model.safetensors"
                                               : fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, files.size());
    write_safetensors(target / name, files[i]);
    for (const Named& t : files[i]) weight_map[t.name] = name;
  }
  if (files.size() > 1) {
    std::ofstream f(target / "model.safetensors.index.json");
    f << nlohmann::ordered_json{{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}}.dump(2) << "\n";
  }
  std::ofstream(target / "config.json") << hf_config(c, dtype).dump(2) << "\n";
  return fmt::format("{}: transformers DeepseekV3 model ({} tensors, {:.1f} MB {}, {} safetensors file{}) from {}", out,
                     weight_map.size(), static_cast<double>(total) / 1e6, dtype == at::kBFloat16 ? "BF16" : "FP32",
                     files.size(), files.size() == 1 ? "" : "s", dir);
}

std::string import_hf(const std::string& hf_dir, const std::string& config_file, const std::string& out) {
  const config::Config c = config::load_config(config_file);
  const config::ModelConfig& m = c.model;
  if (const std::string why = hf_unsupported(m); !why.empty())
    throw std::runtime_error(fmt::format("{}: {}", config_file, why));
  if (fs::exists(out) && (!fs::is_directory(out) || !fs::is_empty(out)))
    throw std::runtime_error(
        fmt::format("{}: exists and is not an empty directory; --out names a new checkpoint "
                    "directory",
                    out));
  const fs::path dir(hf_dir);
  if (!fs::exists(dir / "config.json")) throw std::runtime_error(fmt::format("{}: no config.json", hf_dir));
  // config.json against the config, field by field where both have it.
  const nlohmann::json theirs = nlohmann::json::parse(std::ifstream(dir / "config.json"), nullptr, false);
  if (theirs.is_discarded() || !theirs.is_object())
    throw std::runtime_error(fmt::format("{}/config.json: not a JSON object", hf_dir));
  std::vector<std::string> disagree;
  const nlohmann::json ours_json = hf_config(c, at::kFloat);
  for (const auto& [key, value] : ours_json.items()) {
    if (key == "dtype" || key == "max_position_embeddings" || key == "initializer_range" || key == "use_cache" ||
        key == "architectures" || !theirs.contains(key))
      continue;
    const nlohmann::json& t = theirs.at(key);
    const bool same = (t.is_number() && value.is_number()) ? t.get<double>() == value.get<double>() : t == value;
    if (!same) disagree.push_back(fmt::format("{} is {} there but {} by the config", key, t.dump(), value.dump()));
  }
  if (!disagree.empty())
    throw std::runtime_error(fmt::format("{}/config.json does not describe the model of {}: {}", hf_dir, config_file,
                                         fmt::join(disagree, "; ")));

  std::map<std::string, at::Tensor> hf = read_safetensors(dir);
  // What the model holds: global names (routed experts stacked) and shapes.
  model::Transformer model(m, model::StageSpec::whole(m));
  std::map<std::string, std::vector<int64_t>> expected;
  std::vector<model::ParamInfo> infos = model::parameter_roles(*model);
  for (auto& b : model::buffer_roles(*model)) infos.push_back(std::move(b));
  for (const model::ParamInfo& p : infos) expected[p.global_name()] = p.global_shape();
  std::map<std::string, at::Tensor> ours;
  std::vector<std::string> problems;
  std::set<std::string> used;
  for (const Correspondence& link : links(m)) {
    const auto it = hf.find(link.hf);
    if (it == hf.end()) {
      if (link.link != Link::kCopy) problems.push_back(fmt::format("{} is missing", link.hf));
      continue;
    }
    used.insert(link.hf);
    if (link.link == Link::kCopy) continue;
    std::vector<at::Tensor> parts;
    const at::Tensor& t = it->second;
    if (link.link == Link::kFuseExperts && t.dim() == 3 && t.size(1) % 2 == 0) {
      parts = {t.narrow(1, 0, t.size(1) / 2).contiguous(), t.narrow(1, t.size(1) / 2, t.size(1) / 2).contiguous()};
    } else if (link.link == Link::kSwapHalves && t.dim() == 2 && t.size(1) % 2 == 0) {
      parts = {swap_halves(t)};
    } else {
      parts = {t};
    }
    for (size_t i = 0; i < link.ours.size(); ++i) {
      const std::vector<int64_t>& want = expected.at(link.ours[i]);
      const at::Tensor& got = parts[std::min(i, parts.size() - 1)];
      if (got.sizes().vec() != want)
        problems.push_back(fmt::format("{} has shape {}, the config's {} needs {}", link.hf,
                                       nlohmann::json(t.sizes().vec()).dump(), link.ours[i],
                                       nlohmann::json(want).dump()));
      else
        ours[link.ours[i]] = got;
    }
  }
  std::vector<std::string> unused;
  for (const auto& [name, t] : hf)
    if (!used.count(name)) unused.push_back(name);
  if (!unused.empty())
    problems.push_back(fmt::format("{} tensor(s) the config has no place for: {}{}", unused.size(),
                                   fmt::join(unused.begin(), unused.begin() + std::min<size_t>(unused.size(), 5), ", "),
                                   unused.size() > 5 ? ", ..." : ""));
  if (!problems.empty())
    throw std::runtime_error(fmt::format("{} does not fit {}: {}", hf_dir, config_file, fmt::join(problems, "; ")));

  SaveRequest r;
  r.root = out;
  r.step = 0;
  r.meta = {{"config", config::to_yaml(c)},
            {"layout", {{"pp", 1}, {"dp", 1}, {"ep", 1}, {"world_size", 1}}},
            {"trainer", {{"step", 0}, {"samples_consumed", 0}, {"tokens_seen", 0}, {"data", data::to_json({})}}}};
  for (const auto& [name, t] : ours) r.tensors.push_back({"model/" + name, t});
  r.tensors.push_back({"optim/step", at::zeros({}, at::kLong)});
  r.tensors.push_back({"rng/0", at::detail::getDefaultCPUGenerator().get_state()});
  fs::create_directories(out);
  parallel::ControlPlane control;
  const std::string step = commit(r, write_shard(r, 0), control);
  return fmt::format("{}: {} tensors from {} (FP32 weights, no optimizer state: train --init-from {})", step,
                     ours.size(), hf_dir, out);
}

}  // namespace moetrain::checkpoints
