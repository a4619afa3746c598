// Checkpoints to and from other tools. export_hf writes a Hugging Face transformers DeepseekV3 model folder:
// config.json and safetensors weights (one file, or shards with model.safetensors.index.json past a size limit), in
// the layout transformers 5.x loads (fused experts: gate_up_proj [E, 2·inter, d] and down_proj [E, d, inter] per
// layer; the router's bias as e_score_correction_bias) and the MTP modules in DeepSeek-V3's released layout (layer
// num_layers + k: eh_proj over [enorm(embedding); hnorm(hidden)], enorm, hnorm, shared_head.norm, and copies of
// the embedding and the head), which transformers leaves unused.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>

#include "checkpoints/checkpoint.h"
#include "config/config.h"

namespace moetrain::checkpoints {

// The config a checkpoint was saved with (its index's meta.config), loaded and validated as a config file is.
config::Config saved_config(const Checkpoint& ck);

// The reason transformers' DeepseekV3 cannot express model `m` exactly, or "" when it can.
std::string hf_unsupported(const config::ModelConfig& m);

// Writes the export into the directory `out` (created; refused when it holds files). dtype: kFloat or kBFloat16
// (the router's bias stays FP32, as transformers keeps it). shard_bytes: the most tensor bytes per safetensors file.
// Returns a one-line summary.
std::string export_hf(const std::string& dir, const std::string& out, at::ScalarType dtype, int64_t shard_bytes);

// Reads a transformers DeepseekV3 folder (config.json, model.safetensors or shards with their index; FP32, BF16 or
// FP16) into a new checkpoint directory `out` (its step_0000000) for the model of config file `config_file`:
// config.json's fields must agree with it, every tensor's shape is checked (each mismatch named), tensors the config
// has no place for are refused. The checkpoint holds the weights in FP32 and no optimizer state: `train
// --init-from` starts a run from it (step 0, fresh optimizer). Returns a one-line summary.
std::string import_hf(const std::string& hf_dir, const std::string& config_file, const std::string& out);

}  // namespace moetrain::checkpoints
