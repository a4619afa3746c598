// Gradient reduction after the backward passes of a step, and the global gradient norm, by parameter role
// (model/param_roles.h):
//   - routed-expert parameters: summed over edp (the replicas of the same experts);
//   - everything else: summed over dp;
//   - the shared token embedding: then also summed over the embedding group (first stage and the last stage's
//     copy used by MTP / a tied head), so both copies stay identical.
// Losses are divided by the global token count before backward, so sums are the right reduction.
//
// GradSync owns the gradients (as Megatron-Core's gradient buffer and DDP's gradient_as_bucket_view do): one flat
// buffer per bucket of parallel.bucket_size_mb (reverse registration order, the order backward produces them; the
// shared embedding and the routed experts in buckets of their own), each parameter's .grad a view into it. The
// backward pass accumulates into the views in place, in the buffer's dtype — FP32 for BF16 parameters, so that
// micro-batches accumulate in FP32 — and a bucket is reduced in place, with no copy in or out. A parameter without
// a gradient (an expert that saw no token here) takes part with zeros.
//
// Overlap (parallel.overlap_grad_reduce, Megatron-Core's overlap_grad_reduce): armed before the step's last
// backward pass, a hook after each parameter's gradient accumulation counts it, and a bucket whose every gradient
// is final starts its non-blocking reduction at once, while the backward pass goes on; reduce() then starts the
// rest (buckets with a parameter that got no gradient in that pass) and waits for all. The buckets of one group
// start in bucket order on every rank, whatever order their gradients became final in, so that every rank issues
// the group's collectives in the same order; the results are the same as reducing after the backward pass.
//
// ZeRO-1 (parallel.distributed_optimizer, Megatron-Core's distributed optimizer): each bucket is padded to a
// multiple of its group's size and cut into equal slices, slice r belonging to group rank r. The gradients are
// reduce-scattered (each rank receives the sum of its slice only); the optimizer updates, and keeps its master
// weights and AdamW moments for, only the parameter elements in its slices — its `pieces()`; gather_params() then
// all-gathers the updated slices, in the parameters' dtype (BF16 in the bf16 and fp8 modes), into the bucket's
// gradient buffer, which is free by then, so every replica holds every parameter again. The gradient norm is
// summed from the slices. The reduce-scatter is in place (the slice's sum lands in the bucket buffer itself), so
// it needs no memory of its own, and the parameters' .grad views hold no meaningful values after it. The all-gather
// is in place too: each rank writes its slice at its place in the buffer.
//
// Overlapped gather (parallel.overlap_param_gather, Megatron-Core's overlap_param_gather): gather_params() starts
// every bucket's all-gather, in the order the forward pass uses them, and returns; finish_gather(params) — called
// by the model before each layer and before the embedding (model::TransformerImpl::param_gate) — waits for the
// buckets holding those parameters only, copies them into the parameters and zeroes the bucket, while advancing the
// others. The rest is finished before the forward pass reaches the head (the trainer calls finish_gather()), so
// none is in flight when a backward pass accumulates gradients into the buffers. Same numbers as gathering at once.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <unordered_map>
#include <vector>

#include "model/param_roles.h"
#include "parallel/process_groups.h"

namespace moetrain::parallel {

// Elements [offset, offset + numel) of a parameter (flattened, row-major) that this rank's optimizer updates.
struct ShardPiece {
  size_t param = 0;    // index into the parameters GradSync was given
  int64_t offset = 0;  // 0 and the whole numel for a whole parameter
  int64_t numel = 0;
  bool partitioned = false;  // false: the whole parameter, in a group of one rank (no other rank updates it)
};

// The piece's elements of `param` as a flat view (updates through it reach the parameter); a parameter that is
// not contiguous is a logic error naming it.
at::Tensor piece_view(const at::Tensor& param, const std::string& name, const ShardPiece& piece);

class GradSync {
 public:
  // From p: bucket_size_mb, distributed_optimizer (ZeRO-1, where dp > 1) and overlap_grad_reduce (buckets
  // reduced during the armed backward pass: hooks on the parameters, removed on destruction). Points every
  // parameter's .grad at its view of the buffers, zeroed.
  GradSync(ProcessGroups& groups, std::vector<model::ParamInfo> params, const config::ParallelConfig& p);
  ~GradSync();
  GradSync(const GradSync&) = delete;
  GradSync& operator=(const GradSync&) = delete;

  bool sharded() const { return sharded_; }
  // ZeRO-1: this rank's pieces, bucket by bucket (whole routed experts in registration order); empty when not
  // sharded.
  const std::vector<ShardPiece>& pieces() const { return pieces_; }

  // Zeroes every gradient in place (the start of a step; a bucket whose gather is in flight is zeroed when it
  // finishes); the .grad views stay.
  void zero_grads();
  // The next backward pass is the step's last (with overlap: each bucket starts its reduction when its gradients
  // are final). Without overlap nothing happens until reduce().
  void arm();
  // Buckets whose reduction started during the backward pass (the last reduce(); for tests and the note).
  int64_t started_early() const { return started_early_; }
  // Not sharded: each parameter's .grad becomes the sum over its replicas. Sharded: piece_grads() become the
  // sums of the pieces (the parameters' .grad keep this rank's own contributions).
  void reduce();
  // After reduce() (sharded): the summed gradient of each piece, in pieces() order: shaped as the parameter for
  // a whole piece, flat for a part. Released by gather_params().
  const std::vector<at::Tensor>& piece_grads() const { return piece_grads_; }
  // Sharded: after the optimizer updated this rank's pieces, whose new values are `values` (pieces() order, flat
  // or shaped: the optimizer's master pieces or views of the parameters), every replica receives every slice in
  // the parameters' dtype; the gradients are overwritten (no-op when not sharded). With overlap_param_gather it
  // only starts the all-gathers: the parameters are final once finish_gather() covered them.
  void gather_params(const std::vector<at::Tensor>& values);
  bool gathering() const { return gathering_ > 0; }  // an all-gather started by gather_params() is in flight
  // Waits for the gathers of the buckets holding any of `params` (parameters GradSync was given; others are
  // ignored) and advances the rest without blocking.
  void finish_gather(const std::vector<at::Tensor>& params);
  void finish_gather();  // every gather in flight
  // Buckets whose gather was finished by finish_gather(params), i.e. inside a forward pass, since construction (for
  // tests).
  int64_t gathered_in_forward() const { return gathered_in_forward_; }

  // The L2 norm over every unique parameter of the model once (stages, expert shards and replicas accounted for);
  // the same value on every rank.
  double global_norm();
  // The same squared, on the device ([1], double), for a caller that reads it with other values in one copy.
  at::Tensor global_norm_sq();

 private:
  struct Bucket {
    Communicator* comm = nullptr;   // dp or edp (nullptr or one rank: nothing to reduce)
    bool embedding = false;         // the shared embedding: also summed over the embedding group
    bool partitioned = false;       // ZeRO-1: reduce-scattered and all-gathered
    std::vector<size_t> params;     // indices into params_
    std::vector<int64_t> offsets;   // of each parameter in the flat bucket
    int64_t numel = 0, slice = 0;   // slice: numel padded to a multiple of the group size, divided by it
    at::Tensor grads;               // the flat gradients (slice × group size elements when partitioned)
    std::vector<size_t> pieces;     // indices into pieces_
    std::vector<int64_t> at;        // each piece's position in this rank's slice
    size_t ready = 0;                   // parameters whose gradient is final (armed pass)
    std::unique_ptr<PendingOp> pending; // the reduction, from its start (armed pass or reduce()) to reduce()'s wait
    std::unique_ptr<PendingOp> gather;  // the parameter all-gather, from gather_params() to finish_gather()
  };
  // Partitioned: the bucket's buffer as size() parts of the parameters' dtype (the all-gather's).
  at::Tensor gathered(const Bucket& b) const;
  void finish(Bucket& b);  // its gather: waited for, the parameters copied out, the buffer zeroed
  bool reduces(const Bucket& b) const { return b.comm && b.comm->size() > 1; }
  void grad_ready(size_t param);  // the hook: the armed pass accumulated param's gradient
  void start(Bucket& b);
  void start_ready();             // every bucket ready and first of its group not yet started
  // Consecutive parameters of one dtype up to the bucket size, in the given order (at least one per bucket).
  std::vector<std::vector<size_t>> make_buckets(const std::vector<size_t>& which) const;
  void add_buckets(const std::vector<size_t>& which, Communicator* comm, bool embedding, bool partition);

  ProcessGroups& g_;
  std::vector<model::ParamInfo> params_;
  int64_t bucket_bytes_;
  bool sharded_ = false;
  std::vector<Bucket> buckets_;
  std::vector<ShardPiece> pieces_;
  std::vector<at::Tensor> piece_grads_;
  bool overlap_ = false, armed_ = false;
  std::vector<size_t> bucket_of_;           // per parameter: its bucket (only parameters with a hook are looked up)
  std::vector<char> final_;                 // per parameter: its gradient is final in the armed pass
  std::vector<std::vector<size_t>> lanes_;  // bucket indices per group, in bucket order
  std::vector<size_t> next_;                // per lane: the first bucket not yet started
  int64_t started_early_ = 0;
  bool overlap_gather_ = false;
  std::unordered_map<const c10::TensorImpl*, size_t> gather_bucket_;  // parameter -> its partitioned bucket
  int gathering_ = 0;                                                  // buckets whose gather is in flight
  int64_t gathered_in_forward_ = 0;
};

// The dtype gradients are accumulated in for a parameter of dtype t: at least FP32.
c10::ScalarType grad_dtype(c10::ScalarType t);

// Σ‖g‖² over tensors of one device ([1], double there): one multi-tensor pass (per-tensor norms in FP32, squared
// and summed in double), instead of a double copy of every gradient. Empty: zero, on the CPU.
at::Tensor squared_norm(const std::vector<at::Tensor>& grads);

}  // namespace moetrain::parallel
