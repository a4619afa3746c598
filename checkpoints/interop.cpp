#include "checkpoints/interop.h"

#include <ATen/ops/cat.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <utility>
#include <vector>

#include <unistd.h>

#include "config/loader.h"

namespace moetrain::checkpoints {
namespace fs = std::filesystem;
namespace {

struct Named {
  std::string name;
  at::Tensor tensor;
};

// Our global names (model/<name> in a checkpoint) under transformers' for one decoder block at `prefix`.
void block_tensors(Checkpoint& ck, const std::string& ours, const std::string& prefix, const config::ModelConfig& m,
                   bool moe, std::vector<Named>& out) {
  auto read = [&](const std::string& name) { return ck.read("model/" + ours + name); };
  auto add = [&](const std::string& name, at::Tensor t) { out.push_back({prefix + name, std::move(t)}); };
  add("input_layernorm.weight", read("attn_norm.weight"));
  if (m.q_lora_rank > 0) {
    add("self_attn.q_a_proj.weight", read("attn.wq_a"));
    add("self_attn.q_a_layernorm.weight", read("attn.q_norm.weight"));
    add("self_attn.q_b_proj.weight", read("attn.wq_b"));
  } else {
    add("self_attn.q_proj.weight", read("attn.wq"));
  }
  add("self_attn.kv_a_proj_with_mqa.weight", read("attn.wkv_a"));
  add("self_attn.kv_a_layernorm.weight", read("attn.kv_norm.weight"));
  add("self_attn.kv_b_proj.weight", read("attn.wkv_b"));
  add("self_attn.o_proj.weight", read("attn.wo"));
  add("post_attention_layernorm.weight", read("ffn_norm.weight"));
  if (!moe) {
    add("mlp.gate_proj.weight", read("mlp.w_gate"));
    add("mlp.up_proj.weight", read("mlp.w_up"));
    add("mlp.down_proj.weight", read("mlp.w_down"));
    return;
  }
  add("mlp.gate.weight", read("moe.router.weight"));
  add("mlp.gate.e_score_correction_bias", read("moe.router.bias"));
  add("mlp.experts.gate_up_proj", at::cat({read("moe.experts.w_gate"), read("moe.experts.w_up")}, 1));
  add("mlp.experts.down_proj", read("moe.experts.w_down"));
  if (m.n_shared_experts > 0) {
    add("mlp.shared_experts.gate_proj.weight", read("moe.shared.w_gate"));
    add("mlp.shared_experts.up_proj.weight", read("moe.shared.w_up"));
    add("mlp.shared_experts.down_proj.weight", read("moe.shared.w_down"));
  }
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
    case at::kFloat: return "F32";
    case at::kBFloat16: return "BF16";
    default: throw std::logic_error("safetensors_dtype: unexpected dtype");
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
    return fmt::format("model.norm_eps is {}: transformers' DeepseekV3 fixes the q and kv latent norms' epsilon at "
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
  if (fs::exists(fs::path(dir) / "index.json") && fs::absolute(target).string().rfind(fs::absolute(dir).string(), 0) == 0)
    throw std::runtime_error(fmt::format("{}: inside the checkpoint {}; write the export outside it", out, dir));

  std::vector<Named> tensors;
  tensors.push_back({"model.embed_tokens.weight", ck.read("model/embed.weight")});
  for (int64_t l = 0; l < m.num_layers; ++l)
    block_tensors(ck, fmt::format("layers.{}.", l), fmt::format("model.layers.{}.", l), m, l >= m.n_dense_layers,
                  tensors);
  tensors.push_back({"model.norm.weight", ck.read("model/norm.weight")});
  const at::Tensor head = m.tie_embeddings ? ck.read("model/embed.weight") : ck.read("model/head.weight");
  if (!m.tie_embeddings) tensors.push_back({"lm_head.weight", head});
  const int64_t d = m.hidden_size;
  for (int64_t k = 0; k < m.mtp_depth; ++k) {
    const std::string ours = fmt::format("mtp.{}.", k), prefix = fmt::format("model.layers.{}.", m.num_layers + k);
    // Ours projects [hnorm(h); enorm(e)], the released eh_proj [enorm(e); hnorm(h)]: the column halves swap.
    const at::Tensor proj = ck.read("model/" + ours + "proj");
    tensors.push_back({prefix + "eh_proj.weight", at::cat({proj.narrow(1, d, d), proj.narrow(1, 0, d)}, 1)});
    tensors.push_back({prefix + "enorm.weight", ck.read("model/" + ours + "enorm.weight")});
    tensors.push_back({prefix + "hnorm.weight", ck.read("model/" + ours + "hnorm.weight")});
    tensors.push_back({prefix + "embed_tokens.weight", ck.read("model/embed.weight")});
    tensors.push_back({prefix + "shared_head.norm.weight", ck.read("model/" + ours + "norm.weight")});
    tensors.push_back({prefix + "shared_head.head.weight", head});
    block_tensors(ck, ours + "block.", prefix, m, m.n_dense_layers < m.num_layers, tensors);
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
  return fmt::format("{}: transformers DeepseekV3 model ({} tensors, {:.1f} MB {}, {} safetensors file{}) from {}",
                     out, weight_map.size(), static_cast<double>(total) / 1e6,
                     dtype == at::kBFloat16 ? "BF16" : "FP32", files.size(), files.size() == 1 ? "" : "s", dir);
}

}  // namespace moetrain::checkpoints
