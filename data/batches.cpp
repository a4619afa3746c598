#include "data/batches.h"

#include <ATen/ops/empty.h>
#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>

namespace moetrain::data {

BatchShape BatchShape::from(const config::Config& c) {
  return {c.train.micro_batch_size, c.train.micro_batches, c.parallel.dp,
          c.train.seq_len + 1 + c.model.mtp_depth};
}

SyntheticBatches::SyntheticBatches(const config::Config& c)
    : source_(c.model.vocab_size, c.data.synthetic_branching, static_cast<uint64_t>(c.data.synthetic_seed)),
      shape_(BatchShape::from(c)),
      train_sequences_(std::max<int64_t>(1, c.data.synthetic_tokens / shape_.window)) {}

at::Tensor SyntheticBatches::rows(uint64_t stream, int64_t first, bool wrap) const {
  at::Tensor ids32 = at::empty({shape_.micro_batch_size, shape_.window}, at::kInt);
  for (int64_t j = 0; j < shape_.micro_batch_size; ++j) {
    int64_t index = first + j;
    if (wrap) index %= train_sequences_;
    source_.sequence(stream, static_cast<uint64_t>(index), shape_.window, ids32[j].data_ptr<int32_t>());
  }
  return ids32.to(at::kLong);
}

at::Tensor SyntheticBatches::train(int64_t step, int64_t dp_rank, int64_t micro_batch) const {
  return rows(0, shape_.first_sequence(step, dp_rank, micro_batch), /*wrap=*/true);
}

at::Tensor SyntheticBatches::validation(int64_t index, int64_t dp_rank, int64_t micro_batch) const {
  return rows(1, shape_.first_sequence(index, dp_rank, micro_batch), /*wrap=*/false);
}

std::unique_ptr<BatchSource> make_batch_source(const config::Config& c) {
  if (c.data.source == "synthetic") return std::make_unique<SyntheticBatches>(c);
  throw std::runtime_error(fmt::format("{}data.source = {}: token shards are read by the data pipeline, which this "
                                       "build does not have yet; use data.source = synthetic",
                                       c.where("data.source"), c.data.source));
}

}  // namespace moetrain::data
