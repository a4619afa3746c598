// The sample order and the shard batch source: permutations, the document split and window packing, the blend,
// dp-independence (every sample once per epoch on any dp, ranks disjoint), exact resume (also on another dp size
// or global batch), prefetching, and the config errors (seq_len larger than the data, vocabulary, tokenizer).
#include "data/sampler.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <array>
#include <fstream>
#include <map>
#include <numeric>
#include <set>
#include <thread>

#include "data/blend.h"
#include "data/dataset.h"
#include "data/prefetch.h"
#include "data/shard_batches.h"
#include "tests/data/test_corpus.h"

namespace moetrain::data {
namespace {

namespace fs = std::filesystem;
using testing::error_of;
using testing::ScratchDir;
using testing::shard_config;
using testing::write_counting_corpus;

std::vector<int64_t> row(const at::Tensor& batch, int64_t j) {
  at::Tensor r = batch[j].contiguous();
  return {r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + r.numel()};
}

// Documents of assorted lengths: 40 documents, a few hundred windows of 9 tokens.
std::vector<int64_t> assorted_lengths() {
  std::vector<int64_t> lengths;
  for (int i = 0; i < 40; ++i) lengths.push_back(3 + (i * 7) % 23);
  return lengths;
}

TEST(Permutation, IsABijectionForEverySize) {
  for (uint64_t n : {1, 2, 3, 4, 5, 7, 8, 9, 100, 1000, 4097, 65536}) {
    for (uint64_t key : {0ull, 1ull, 0xDEADBEEFull}) {
      Permutation p(n, key);
      std::vector<bool> seen(n, false);
      for (uint64_t i = 0; i < n; ++i) {
        const uint64_t v = p(i);
        ASSERT_LT(v, n);
        ASSERT_FALSE(seen[v]) << "n " << n << " key " << key;
        seen[v] = true;
      }
    }
  }
  // Different keys give different orders, and the order is not the identity.
  Permutation a(1000, 1), b(1000, 2);
  int same = 0, fixed = 0;
  for (uint64_t i = 0; i < 1000; ++i) {
    same += a(i) == b(i);
    fixed += a(i) == i;
  }
  EXPECT_LT(same, 20);
  EXPECT_LT(fixed, 20);
}

TEST(Sampler, EveryEpochVisitsEverySampleOnceInAFreshOrder) {
  const int64_t n = 37;
  Sampler s(n, 42, 0);
  std::vector<int64_t> e0, e1;
  for (int64_t d = 0; d < n; ++d) e0.push_back(s.sample(d));
  for (int64_t d = n; d < 2 * n; ++d) e1.push_back(s.sample(d));
  EXPECT_EQ(s.epoch(n - 1), 0);
  EXPECT_EQ(s.epoch(n), 1);
  EXPECT_NE(e0, e1);
  std::sort(e0.begin(), e0.end());
  std::sort(e1.begin(), e1.end());
  std::vector<int64_t> all(n);
  std::iota(all.begin(), all.end(), 0);
  EXPECT_EQ(e0, all);
  EXPECT_EQ(e1, all);
  // Another seed, another order; the same seed, the same order.
  Sampler t(n, 43, 0), u(n, 42, 0);
  int same = 0;
  for (int64_t d = 0; d < n; ++d) {
    same += t.sample(d) == s.sample(d);
    EXPECT_EQ(u.sample(d), s.sample(d));
  }
  EXPECT_LT(same, 8);
}

TEST(Blend, ParsesPrefixesAndWeights) {
  auto one = parse_blend("corpus/web");
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].prefix, "corpus/web");
  EXPECT_EQ(one[0].weight, 1.0);
  auto two = parse_blend("a=0.7, b = 0.3");
  ASSERT_EQ(two.size(), 2u);
  EXPECT_EQ(two[1].prefix, "b");
  EXPECT_EQ(two[1].weight, 0.3);
  EXPECT_EQ(error_of([] { parse_blend("a=0.7,b=x"); }), "data.path entry 'b=x': the weight 'x' is not a positive number");
  EXPECT_EQ(error_of([] { parse_blend("a=-1"); }), "data.path entry 'a=-1': the weight '-1' is not a positive number");
  EXPECT_NE(error_of([] { parse_blend("a,,b"); }).find("an empty entry"), std::string::npos);
}

TEST(Blend, ProportionsAndDrawCounts) {
  Blend b({3.0, 1.0, 0.5});
  EXPECT_EQ(b.slots(), (std::vector<int64_t>{2731, 910, 455}));  // 4096 · (3, 1, 0.5) / 4.5, rounded to sum 4096
  std::vector<int64_t> draws(3, 0);
  for (int64_t p = 0; p < 3 * kBlendBlock + 100; ++p) {
    const Blend::Draw d = b.at(p);
    EXPECT_EQ(d.index, draws[d.dataset]) << p;  // draws of a dataset are numbered in order
    ++draws[d.dataset];
    for (size_t i = 0; i < 3; ++i) ASSERT_EQ(b.draws_before(i, p + 1), draws[i]);
  }
  // Evenly interleaved: in any 100 consecutive positions dataset 0 gets close to 2/3.
  for (int64_t start = 0; start < kBlendBlock; start += 500) {
    int64_t zero = 0;
    for (int64_t p = start; p < start + 100; ++p) zero += b.at(p).dataset == 0;
    EXPECT_NEAR(zero, 67, 2);
  }
}

TEST(Dataset, SplitsByDocumentAndPacksWindows) {
  ScratchDir dir;
  write_counting_corpus(dir / "c", assorted_lengths(), 1u << 20, /*shard_tokens=*/100);
  auto set = std::make_shared<const ShardSet>(dir / "c");
  ASSERT_GT(set->shards().size(), 3u);
  const Dataset ds(set, 0.1, /*window=*/9, /*stride=*/7);
  EXPECT_EQ(Dataset::held_out(40, 0.1), 4u);
  EXPECT_EQ(ds.validation().documents(), 4u);
  EXPECT_EQ(ds.train().documents(), 36u);
  // Held-out documents are spread: 9, 19, 29, 39 of 40.
  std::vector<uint64_t> held;
  for (uint64_t d = 0; d < 40; ++d)
    if (Dataset::is_validation(d, 40, 4)) held.push_back(d);
  EXPECT_EQ(held, (std::vector<uint64_t>{9, 19, 29, 39}));

  // The training stream is the training documents, end tokens included, in order; windows start 7 apart.
  std::vector<int64_t> stream;
  for (uint64_t d = 0; d < 40; ++d)
    if (!Dataset::is_validation(d, 40, 4)) {
      auto doc = set->document(d);
      stream.insert(stream.end(), doc.begin(), doc.end());
    }
  EXPECT_EQ(ds.train().tokens(), stream.size());
  EXPECT_EQ(ds.train().windows(), static_cast<int64_t>((stream.size() - 9) / 7 + 1));
  std::vector<int64_t> w(9);
  for (int64_t k = 0; k < ds.train().windows(); ++k) {
    ds.train().read(k, w.data());
    ASSERT_EQ(w, std::vector<int64_t>(stream.begin() + 7 * k, stream.begin() + 7 * k + 9)) << k;
  }
  // The validation stream holds exactly the held-out documents.
  std::vector<int64_t> valid;
  for (uint64_t d : held) {
    auto doc = set->document(d);
    valid.insert(valid.end(), doc.begin(), doc.end());
  }
  EXPECT_EQ(ds.validation().tokens(), valid.size());
  ds.validation().read(0, w.data());
  EXPECT_EQ(w, std::vector<int64_t>(valid.begin(), valid.begin() + 9));
}

// All training rows of every rank for the first `steps` steps, keyed by global position.
std::map<int64_t, std::vector<int64_t>> rows_by_position(const ShardBatches& b, int64_t steps, int64_t dp,
                                                          std::vector<std::set<std::vector<int64_t>>>* per_rank) {
  std::map<int64_t, std::vector<int64_t>> out;
  const BatchShape& s = b.shape();
  for (int64_t step = 0; step < steps; ++step)
    for (int64_t r = 0; r < dp; ++r)
      for (int64_t mb = 0; mb < s.micro_batches; ++mb) {
        at::Tensor batch = b.train(step, r, mb);
        EXPECT_EQ(batch.sizes(), (std::vector<int64_t>{s.micro_batch_size, s.window}));
        for (int64_t j = 0; j < s.micro_batch_size; ++j) {
          const int64_t pos = b.position(step, r, mb) + j;
          EXPECT_TRUE(out.emplace(pos, row(batch, j)).second) << "position " << pos << " served twice";
          if (per_rank) (*per_rank)[static_cast<size_t>(r)].insert(row(batch, j));
        }
      }
  return out;
}

TEST(ShardBatches, EveryDpSizeSeesEverySampleOncePerEpochInTheSameGlobalOrder) {
  ScratchDir dir;
  write_counting_corpus(dir / "c", assorted_lengths(), 1u << 20, 100);
  // The global batch is 12 sequences on every layout: (dp, micro_batch_size, micro_batches).
  const std::vector<std::array<int64_t, 3>> layouts = {{1, 4, 3}, {2, 2, 3}, {3, 4, 1}, {4, 3, 1}};
  std::map<int64_t, std::vector<int64_t>> reference;
  for (const auto& [dp, mbs, mbn] : layouts) {
    ShardBatches b(shard_config(dir / "c", dp, mbs, mbn));
    const int64_t n = b.datasets()[0]->train().windows();
    ASSERT_GT(n, 40);
    ASSERT_NE(n % 12, 0);  // the epoch ends inside a step
    std::vector<std::set<std::vector<int64_t>>> per_rank(static_cast<size_t>(dp));
    const int64_t steps = 2 * n / 12 + 1;  // more than two epochs
    auto rows = rows_by_position(b, steps, dp, &per_rank);
    // Epoch 0 (positions 0..n-1) and epoch 1 are each every window exactly once.
    std::set<std::vector<int64_t>> all;
    std::vector<std::vector<int64_t>> stored;  // windows in corpus order
    std::vector<int64_t> w(9);
    for (int64_t k = 0; k < n; ++k) {
      b.datasets()[0]->train().read(k, w.data());
      all.insert(w);
      stored.push_back(w);
    }
    ASSERT_EQ(static_cast<int64_t>(all.size()), n);  // windows are distinct (counting corpus)
    for (int64_t epoch = 0; epoch < 2; ++epoch) {
      std::multiset<std::vector<int64_t>> seen;
      for (int64_t p = epoch * n; p < (epoch + 1) * n; ++p) {
        seen.insert(rows.at(p));
        EXPECT_EQ(b.train_sample(p).epoch, epoch);
      }
      EXPECT_EQ(std::set<std::vector<int64_t>>(seen.begin(), seen.end()), all) << "dp " << dp;
      EXPECT_EQ(seen.size(), all.size()) << "dp " << dp;
    }
    // Within an epoch no two ranks share a sample (over the whole run only the epoch wrap may repeat one).
    std::multiset<std::vector<int64_t>> epoch0_by_rank;
    for (int64_t step = 0; step * 12 + 12 <= n; ++step)
      for (int64_t r = 0; r < dp; ++r)
        for (int64_t mb = 0; mb < mbn; ++mb) {
          at::Tensor batch = b.train(step, r, mb);
          for (int64_t j = 0; j < mbs; ++j) epoch0_by_rank.insert(row(batch, j));
        }
    for (const auto& x : epoch0_by_rank) EXPECT_EQ(epoch0_by_rank.count(x), 1u);
    // The global order is the same whatever dp.
    if (reference.empty()) reference = rows;
    EXPECT_EQ(rows, reference) << "dp " << dp;
    // Epochs are shuffled: few positions read the window stored there.
    int64_t in_place = 0;
    for (int64_t p = 0; p < n; ++p) in_place += rows.at(p) == stored[static_cast<size_t>(p)];
    EXPECT_LT(in_place, n / 5);
  }
}

TEST(ShardBatches, ResumeGivesTheBatchesOfAnUninterruptedRun) {
  ScratchDir dir;
  write_counting_corpus(dir / "c", assorted_lengths(), 1u << 20, 100);
  const config::Config c4 = shard_config(dir / "c", 2, 2, 3);  // dp 2, global batch 12
  ShardBatches run(c4);
  const int64_t k = 5, end = 12;
  std::vector<std::vector<at::Tensor>> full;  // [step][rank·mb]
  for (int64_t s = 0; s < end; ++s) {
    full.emplace_back();
    for (int64_t r = 0; r < 2; ++r)
      for (int64_t mb = 0; mb < 3; ++mb) full.back().push_back(run.train(s, r, mb));
  }

  // A fresh source asked for step k onwards gives exactly the same batches (positions are a function of step).
  ShardBatches fresh(c4);
  for (int64_t s = k; s < end; ++s)
    for (int64_t r = 0; r < 2; ++r)
      for (int64_t mb = 0; mb < 3; ++mb) EXPECT_TRUE(fresh.train(s, r, mb).equal(full[s][r * 3 + mb]));

  // The saved state: samples consumed, epoch and position in it.
  const DataState st = run.state(k);
  const int64_t n = run.datasets()[0]->train().windows();
  EXPECT_EQ(st.step, k);
  EXPECT_EQ(st.samples_consumed, k * 12);
  EXPECT_EQ(st.epochs, (std::vector<int64_t>{k * 12 / n}));
  EXPECT_EQ(st.samples_in_epoch, (std::vector<int64_t>{k * 12 % n}));
  EXPECT_EQ(st.seed, 42u);
  EXPECT_EQ(st.fingerprint, run.fingerprint());

  // Resumed on dp 4 and dp 1 (same global batch): each step's rows, all ranks in order, are the same.
  for (const auto& [dp, mbs, mbn] : std::vector<std::array<int64_t, 3>>{{4, 3, 1}, {1, 6, 2}}) {
    ShardBatches other(shard_config(dir / "c", dp, mbs, mbn));
    other.resume(st);
    for (int64_t s = k; s < end; ++s) {
      std::vector<at::Tensor> a, b;
      for (int64_t r = 0; r < dp; ++r)
        for (int64_t mb = 0; mb < mbn; ++mb) a.push_back(other.train(s, r, mb));
      EXPECT_TRUE(at::cat(a).equal(at::cat(full[s]))) << "dp " << dp << " step " << s;
    }
  }

  // Resumed with another global batch (8 sequences): the sequence of rows continues at the saved position.
  ShardBatches smaller(shard_config(dir / "c", 2, 2, 2));
  smaller.resume(st);
  std::vector<at::Tensor> a, b;
  for (int64_t s = k; s < end; ++s)
    for (int64_t r = 0; r < 2; ++r)
      for (int64_t mb = 0; mb < 2; ++mb) a.push_back(smaller.train(s, r, mb));
  for (int64_t s = k; s < end; ++s) b.push_back(at::cat(full[s]));
  at::Tensor got = at::cat(a), want = at::cat(b);
  EXPECT_TRUE(got.equal(want.narrow(0, 0, got.size(0))));
  EXPECT_EQ(smaller.state(end).samples_consumed, k * 12 + (end - k) * 8);

  // A state from other data or another seed is refused.
  config::Config seed = c4;
  seed.train.seed = 7;
  ShardBatches reseeded(seed);
  EXPECT_EQ(error_of([&] { reseeded.resume(st); }), "data state: saved with seed 42, this run's data order uses seed 7");
  config::Config longer = c4;
  longer.train.seq_len = 8;
  ShardBatches relonged(longer);
  EXPECT_NE(error_of([&] { relonged.resume(st); }).find("data state: saved for other data"), std::string::npos);
  DataState bad = st;
  bad.samples_in_epoch[0] += 1;
  EXPECT_NE(error_of([&] { fresh.resume(bad); }).find("data state: inconsistent"), std::string::npos);
}

TEST(ShardBatches, BlendDrawsEachCorpusInItsShareAndCyclesEachInItsOwnEpochs) {
  ScratchDir dir;
  write_counting_corpus(dir / "a", assorted_lengths(), 1u << 20);
  write_counting_corpus(dir / "b", {200, 200, 200, 200, 200}, 1u << 20);  // b's windows count from 1 again
  config::Config c = shard_config(dir / "a=3," + dir / "b=1", 1, 4, 4);
  c.data.valid_fraction = 0.2;
  ShardBatches blend(c);
  ASSERT_EQ(blend.datasets().size(), 2u);
  const int64_t na = blend.datasets()[0]->train().windows(), nb = blend.datasets()[1]->train().windows();
  std::vector<std::multiset<int64_t>> windows(2);
  const int64_t positions = 3 * (na + nb);
  for (int64_t p = 0; p < positions; ++p) {
    const auto s = blend.train_sample(p);
    if (s.epoch == 0) windows[s.dataset].insert(s.window);
  }
  for (size_t i = 0; i < 2; ++i) {
    const int64_t n = i == 0 ? na : nb;
    EXPECT_EQ(static_cast<int64_t>(windows[i].size()), n) << i;  // epoch 0 of each: every window once
    EXPECT_EQ(static_cast<int64_t>(std::set<int64_t>(windows[i].begin(), windows[i].end()).size()), n);
  }
  const DataState st = blend.state(10);
  EXPECT_EQ(st.epochs.size(), 2u);
  EXPECT_EQ(blend.blend().draws_before(0, 160) + blend.blend().draws_before(1, 160), 160);
  EXPECT_NEAR(static_cast<double>(blend.blend().draws_before(0, 160)) / 160, 0.75, 0.01);
  // Rows really come from the drawn corpus.
  at::Tensor batch = blend.train(0, 0, 0);
  std::vector<int64_t> w(9);
  for (int64_t j = 0; j < 4; ++j) {
    const auto s = blend.train_sample(j);
    blend.datasets()[s.dataset]->train().read(s.window, w.data());
    EXPECT_EQ(row(batch, j), w);
  }
}

TEST(ShardBatches, ValidationReadsTheHeldOutDocumentsInOrder) {
  ScratchDir dir;
  write_counting_corpus(dir / "c", assorted_lengths(), 1u << 20);
  ShardBatches b(shard_config(dir / "c", 2, 2, 1));
  const PackedStream& held = b.datasets()[0]->validation();
  std::vector<int64_t> w(9);
  for (int64_t index = 0; index < 3; ++index)
    for (int64_t r = 0; r < 2; ++r) {
      at::Tensor batch = b.validation(index, r, 0);
      for (int64_t j = 0; j < 2; ++j) {
        held.read((index * 4 + r * 2 + j) % held.windows(), w.data());
        EXPECT_EQ(row(batch, j), w);
      }
    }
}

TEST(ShardBatches, ConfigErrorsNameTheFileAndKey) {
  ScratchDir dir;
  write_counting_corpus(dir / "c", {20, 20, 20, 20}, 1000);
  const std::string idx = shard_path(dir / "c", 0, "idx");
  config::Config c = shard_config(dir / "c", 1, 1, 1, /*seq_len=*/64, /*vocab=*/1000);
  c.data.valid_fraction = 0.25;
  EXPECT_EQ(error_of([&] { ShardBatches b(c); }),
            idx + ": the 3 training documents hold 63 tokens, fewer than one window of 66 tokens (train.seq_len + 1 + "
                  "model.mtp_depth): train.seq_len is larger than the data");
  c.train.seq_len = 40;
  EXPECT_EQ(error_of([&] { ShardBatches b(c); }),
            idx + ": the 1 validation documents (data.valid_fraction = 0.25) hold 21 tokens, fewer than one window of "
                  "42 tokens (train.seq_len + 1 + model.mtp_depth): raise data.valid_fraction or lower train.seq_len");
  c.train.seq_len = 8;
  c.model.vocab_size = 999;
  EXPECT_EQ(error_of([&] { ShardBatches b(c); }),
            idx + ": the shards use a vocabulary of 1000 ids, more than model.vocab_size = 999");
  c.model.vocab_size = 1000;
  c.data.valid_fraction = 0;
  EXPECT_NE(error_of([&] { ShardBatches b(c); }).find("data.valid_fraction = 0 holds out no documents"),
            std::string::npos);
  c.data.valid_fraction = 0.1;
  testing::write_file(dir / "tok.model", "not the tokenizer of these shards");
  c.data.tokenizer = dir / "tok.model";
  EXPECT_NE(error_of([&] { ShardBatches b(c); }).find(dir / "tok.model" + ": the shards were built without a tokenizer"),
            std::string::npos);
  c.data.tokenizer.clear();
  c.data.path = dir / "missing";
  EXPECT_NE(error_of([&] { ShardBatches b(c); }).find(": no token shards at prefix"), std::string::npos);
  write_counting_corpus(dir / "one", {100}, 1000);
  c.data.path = dir / "one";
  EXPECT_NE(error_of([&] { ShardBatches b(c); }).find("1 document: too few to hold out validation documents"),
            std::string::npos);
}

TEST(Prefetch, SameBatchesInOrderOrNotAndErrorsArriveWithTheirBatch) {
  ScratchDir dir;
  write_counting_corpus(dir / "c", assorted_lengths(), 1u << 20);
  const config::Config c = shard_config(dir / "c", 1, 2, 3);
  ShardBatches plain(c);
  PrefetchingSource pre(std::make_unique<ShardBatches>(c), 4, BatchShape::from(c));
  for (int64_t s = 0; s < 6; ++s)
    for (int64_t mb = 0; mb < 3; ++mb) {
      EXPECT_TRUE(pre.train(s, 0, mb).equal(plain.train(s, 0, mb)));
      std::this_thread::sleep_for(std::chrono::milliseconds(2));  // a loop that computes between batches
    }
  const auto st = pre.stats();
  EXPECT_EQ(st.unpredicted, 1);  // only the first request
  EXPECT_EQ(st.ready + st.waited, 17);
  EXPECT_GT(st.ready, 10);
  // Out of order (a jump back, a skip): still the right batches.
  for (auto [s, mb] : std::vector<std::pair<int64_t, int64_t>>{{2, 1}, {9, 0}, {9, 1}, {0, 0}, {9, 2}})
    EXPECT_TRUE(pre.train(s, 0, mb).equal(plain.train(s, 0, mb)));
  EXPECT_TRUE(pre.validation(1, 0, 2).equal(plain.validation(1, 0, 2)));
  EXPECT_EQ(pre.state(3).samples_consumed, 18);
  // Resume through the wrapper drops what was prepared.
  pre.train(10, 0, 0);
  pre.resume(plain.state(4));
  EXPECT_TRUE(pre.train(4, 0, 0).equal(plain.train(4, 0, 0)));

  // A corrupt token: the error comes with the batch that reads it, prepared on the worker thread.
  int64_t first = 0;  // the first position that reads window 0, the only window holding token 0
  while (plain.train_sample(first).window != 0) ++first;
  const int64_t bad_step = first / 6, bad_mb = (first % 6) / 2;
  const std::string bin = shard_path(dir / "c", 0, "bin");
  {
    std::fstream f(bin, std::ios::in | std::ios::out | std::ios::binary);
    const uint32_t id = 1u << 20;  // ids are uint32 here (vocabulary 2^20): one past the last
    f.write(reinterpret_cast<const char*>(&id), sizeof id);
  }
  config::Config p = c;
  p.data.prefetch = 3;
  auto source = make_batch_source(p);
  ASSERT_NE(dynamic_cast<PrefetchingSource*>(source.get()), nullptr);
  for (int64_t s = 0; s <= bad_step; ++s)
    for (int64_t mb = 0; mb < 3; ++mb) {
      const std::string err = error_of([&] { source->train(s, 0, mb); });
      if (s == bad_step && mb == bad_mb) {
        EXPECT_EQ(err, bin + ": token id 1048576 at position 0 is not below the vocabulary size 1048576 (corrupt "
                             "shard)");
        return;
      }
      EXPECT_EQ(err, "") << "step " << s << " micro-batch " << mb;
    }
  FAIL() << "the corrupt batch was never asked for";
}


// The batch-size ramp gives each step the batch Megatron-Core's rule gives it: start + ⌊consumed / per-increment⌋ ·
// increment sequences (at most the final batch), where consumed counts the sequences of the steps before.
TEST(BatchRamp, FollowsMegatronsRule) {
  for (const auto& [start, inc, final, ramp] : std::vector<std::array<int64_t, 4>>{
           {4, 4, 16, 60}, {4, 4, 16, 30}, {3072, 128, 15360, 114501953}, {2, 2, 64, 7}, {8, 8, 32, 1000}}) {
    const BatchRamp r(start, inc, final, ramp);
    const double per = static_cast<double>(ramp) / static_cast<double>((final - start) / inc);
    int64_t consumed = 0;
    for (int64_t step = 0; step < 20000; ++step) {
      const int64_t want =
          std::min(final, start + static_cast<int64_t>(static_cast<double>(consumed) / per) * inc);
      ASSERT_EQ(r.sequences_at(step), want) << "step " << step << " of ramp " << start << "→" << final;
      ASSERT_EQ(r.sequences_before(step), consumed) << "step " << step;
      consumed += want;
    }
    EXPECT_EQ(r.sequences_at(r.ramp_steps()), final);
    EXPECT_LT(r.sequences_at(r.ramp_steps() - 1), final);
    EXPECT_GE(r.sequences_before(r.ramp_steps()), ramp);  // the final batch once the ramp's sequences are trained
  }
  EXPECT_THROW(BatchRamp(4, 5, 16, 60), std::invalid_argument);  // 16 − 4 is not a multiple of 5
  EXPECT_THROW(BatchRamp(16, 4, 16, 60), std::invalid_argument);  // nothing to ramp
}

// Under a ramp the steps' sequences tile the stream without gap or overlap, each step holds exactly its batch on
// any dp size and micro-batching, and a resumed origin gives the same positions.
TEST(BatchRamp, StepsTileTheStreamOnEveryLayout) {
  const auto ramp = std::make_shared<const BatchRamp>(8, 8, 32, 100);
  for (const auto& [dp, mbs] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {1, 4}, {2, 2}, {4, 2}, {8, 1}}) {
    const BatchShape shape{mbs, 32 / (mbs * dp), dp, 9, ramp};
    std::vector<int64_t> seen;
    for (int64_t step = 0; step < 12; ++step) {
      ASSERT_EQ(shape.micro_batches_at(step) * mbs * dp, ramp->sequences_at(step));
      for (int64_t r = 0; r < dp; ++r)
        for (int64_t mb = 0; mb < shape.micro_batches_at(step); ++mb)
          for (int64_t j = 0; j < mbs; ++j) {
            const int64_t pos = shape.first_sequence(step, r, mb) + j;
            EXPECT_GE(pos, shape.sequences_before(step));
            EXPECT_LT(pos, shape.sequences_before(step + 1));
            seen.push_back(pos);
          }
    }
    std::sort(seen.begin(), seen.end());
    std::vector<int64_t> all(static_cast<size_t>(shape.sequences_before(12)));
    std::iota(all.begin(), all.end(), 0);
    EXPECT_EQ(seen, all) << "dp " << dp << ", micro-batch " << mbs;
    const StreamOrigin resumed{5, shape.sequences_before(5)};
    for (int64_t step = 5; step < 12; ++step)
      EXPECT_EQ(resumed.position(shape, step, dp - 1, 0), shape.first_sequence(step, dp - 1, 0));
    EXPECT_EQ(shape.first_validation_sequence(1, 0, 0), 32);  // validation batches keep the final shape
  }
}

}  // namespace
}  // namespace moetrain::data

namespace moetrain::data {
namespace {

// A blend of corpora built with different tokenizers, vocabularies or end tokens is refused, naming both files.
TEST(ShardBatches, BlendCorporaMustShareOneTokenizer) {
  ScratchDir dir;
  write_counting_corpus(dir / "a", {300, 300, 300}, 1000);
  write_counting_corpus(dir / "b", {300, 300, 300}, 1000);
  write_counting_corpus(dir / "v", {300, 300, 300}, 2000);
  {
    TokenShardWriter w(dir / "t", 1000, 999, /*tokenizer_checksum=*/0x1234);
    for (int d = 0; d < 3; ++d) {
      w.append(std::vector<int32_t>(300, 5));
      w.end_document();
    }
    w.finish();
  }
  {
    TokenShardWriter w(dir / "e", 1000, 2, 0);  // end token 2, like a SentencePiece corpus
    for (int d = 0; d < 3; ++d) {
      w.append(std::vector<int32_t>(300, 5));
      w.end_document();
    }
    w.finish();
  }
  EXPECT_NO_THROW(ShardBatches(shard_config(dir / "a," + dir / "b", 1, 2, 1, 7, 2000)));
  const std::string a_idx = dir / "a.00000.idx";
  EXPECT_EQ(error_of([&] { ShardBatches(shard_config(dir / "a," + dir / "v", 1, 2, 1, 7, 2000)); }),
            "data.path: " + dir / "v.00000.idx" + " has vocabulary 2000 but " + a_idx +
                " has 1000; the corpora of a blend must come from one tokenizer (rebuild one with the other's)");
  EXPECT_NE(error_of([&] { ShardBatches(shard_config(dir / "a," + dir / "t", 1, 2, 1, 7, 2000)); })
                .find("has tokenizer checksum 0000000000001234 but " + a_idx + " has 0000000000000000"),
            std::string::npos);
  EXPECT_NE(error_of([&] { ShardBatches(shard_config(dir / "a," + dir / "e", 1, 2, 1, 7, 2000)); })
                .find("has end-of-document id 2 but " + a_idx + " has 999"),
            std::string::npos);
}

}  // namespace
}  // namespace moetrain::data
