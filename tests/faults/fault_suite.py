#!/usr/bin/env python3
"""The fault suite: the fault-injection audit (issue "Nothing lost, nothing crashes") repeated as a test.

    fault_suite.py MOETRAIN KIND [--seed N] [--cases N]

KIND is one of: config, data, checkpoint, kill, ranks. Each kind draws its cases from a seeded generator (the
same seed, the same cases; CTest passes a fixed one, FAULT_SEED overrides it), runs every command under a time
limit and asserts the rules for each case:

  - a refused input ends with a non-zero exit, nothing on stdout, one stderr line "moetrain: error…" naming the
    file, key, tensor or rank at fault — no backtrace, no signal death, no hang;
  - nothing already saved is lost: a checkpoint that verified before still verifies, byte for byte the same;
  - what is accepted works (a harmless corruption resumes to the same numbers as the pristine checkpoint).

The audit's numbered cases and where they are asserted (the two not here are CTest tests of their own, also
labelled `fault`): 1 a diverging run (checkpoints.divergence); 2 a full disk (checkpoints.full_disk); 3 two jobs
on one run directory (ranks); 4 --resume auto without a checkpoint (ranks); 5 a rank killed by the OS, two -np
(ranks); 6 absurd sizes (config); 7 a wrong index.json (checkpoint); 8 export onto the checkpoint's own shard
(checkpoint); 9 a stopped rank (ranks); 10 a failed resume and config.yaml (checkpoint); 11 the smaller ones:
.tmp checkpoints (checkpoint), blends of different tokenizers (data), float keys at 1e308, a directory for a
config file, second YAML documents, sections for --set (config). Every case prints one line; the last line counts
the cases per audit number.
"""

import argparse
import collections
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, "launch", "mpirun.sh")
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
BACKTRACE = re.compile(r"frame #|Exception raised from|Segmentation|Backtrace|core dumped|terminate called|"
                       r"Read -1, expected|\[[\w.-]+:\d+\] \*\*\*")
# One process on the tiny model: the layout of every single-rank case.
ONE_RANK = ["--set", "parallel.pp=1", "--set", "parallel.dp=1", "--set", "parallel.ep=1"]
QUIET = ["--set", "train.eval_interval=0", "--set", "train.peak_flops=1e9"]



def flip_bit(suite, path):
    """Flips one random bit of the file at a random offset; returns the offset."""
    at = suite.rng.randrange(os.path.getsize(path))
    with open(path, "r+b") as fh:
        fh.seek(at)
        b = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([b ^ (1 << suite.rng.randrange(8))]))
    return at

class Result:
    def __init__(self, rc, out, err, elapsed):
        self.rc, self.out, self.err, self.elapsed = rc, out, err, elapsed

    def __str__(self):
        return f"rc {self.rc} after {self.elapsed:.1f} s; stderr: {self.err.strip()[-600:]!r}"


class Suite:
    def __init__(self, binary, kind, seed, tmp):
        self.bin, self.kind, self.seed, self.tmp = binary, kind, seed, tmp
        self.rng = random.Random(f"{kind}:{seed}")
        self.counts = collections.Counter()
        self.cases = 0
        self.failures = []

    # ---- running -------------------------------------------------------------------------------------------
    def run(self, args, timeout=60, env=None):
        start = time.monotonic()
        try:
            p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL, env=dict(os.environ, **(env or {})))
            return Result(p.returncode, p.stdout, p.stderr, time.monotonic() - start)
        except subprocess.TimeoutExpired as e:
            return Result(124, (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else
                          (e.stdout or ""), (e.stderr or b"").decode(errors="replace")
                          if isinstance(e.stderr, bytes) else (e.stderr or ""), time.monotonic() - start)

    def moetrain(self, *args, timeout=60, env=None):
        return self.run([self.bin, *args], timeout=timeout, env=env)

    def mpi(self, np, *args, timeout=120):
        return self.run([LAUNCH, "-np", str(np), "--", self.bin, *args], timeout=timeout)

    # ---- the rules ----------------------------------------------------------------------------------------
    def case(self, audit, name, problems):
        """Records one case: audit numbers it covers, a name, the list of broken rules (empty: it passed)."""
        self.cases += 1
        for a in audit:
            self.counts[a] += 1
        status = "ok  " if not problems else "FAIL"
        print(f"{status} [{self.kind} #{self.cases}, audit {','.join(map(str, audit)) or '-'}] {name}", flush=True)
        for p in problems:
            print(f"       {p}", flush=True)
            self.failures.append(f"{name}: {p}")

    @staticmethod
    def clean_error(r, names=(), stdout_allowed=False, ranks=False):
        """The rules for a refused input; returns the broken ones."""
        bad = []
        if r.rc == 0:
            bad.append(f"exited 0 ({r})")
        if r.rc == 124:
            bad.append(f"did not finish in time ({r})")
        elif r.rc >= 128 or r.rc < 0:
            bad.append(f"died of a signal ({r})")
        if BACKTRACE.search(r.err + r.out):
            bad.append(f"a crash or library noise: {r}")
        lines = [l for l in r.err.splitlines() if l.strip()]
        errors = [l for l in lines if l.startswith("moetrain: error")]
        if len(errors) != 1:
            bad.append(f"expected one 'moetrain: error' line, got {len(errors)}: {r}")
        elif not ranks and len(lines) != 1:
            bad.append(f"expected nothing but the error on stderr: {r}")
        if not stdout_allowed and r.out.strip():
            bad.append(f"printed to stdout: {r.out.strip()[:300]!r}")
        for n in names:
            if errors and not any(re.search(n, e) for e in errors):
                bad.append(f"the error does not name /{n}/: {errors[0]}")
        return bad

    @staticmethod
    def success(r):
        bad = []
        if r.rc != 0:
            bad.append(f"failed: {r}")
        if BACKTRACE.search(r.err + r.out):
            bad.append(f"a crash or library noise: {r}")
        return bad

    # ---- helpers ------------------------------------------------------------------------------------------
    def new_dir(self, name):
        d = os.path.join(self.tmp, name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        return d

    @staticmethod
    def digest(path):
        """sha256 of every file under path (or of the file), by relative name."""
        out = {}
        paths = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
        for p in sorted(paths):
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = hashlib.sha256(f.read()).hexdigest()
        return out

    def train_args(self, run_dir, name, steps, *extra):
        return ["train", "--config", TINY, "--set", f"logging.dir={run_dir}", "--set", f"logging.name={name}",
                "--set", f"train.steps={steps}", *QUIET, *extra]

    @staticmethod
    def step_losses(metrics):
        """{step: the loss as written} from a metrics.jsonl (the training lines)."""
        out = {}
        if not os.path.exists(metrics):
            return out
        with open(metrics) as f:
            for line in f:
                rec = json.loads(line)
                if "lm_loss" in rec and "step" in rec:
                    out[rec["step"]] = (rec.get("loss"), rec["lm_loss"])
        return out

    def summary(self):
        per = ", ".join(f"#{k}: {v}" for k, v in sorted(self.counts.items()))
        print(f"fault suite {self.kind} (seed {self.seed}): {self.cases} cases, {len(self.failures)} failed; "
              f"audit cases {per}", flush=True)
        return 1 if self.failures else 0


# ---- config: mutated keys and YAML files (audit 6, 11) ------------------------------------------------------
INT_VALUES = ["0", "-1", "3", "2.5", "1e18", "1000000", "1099511627776", "4611686018427387904",
              "9223372036854775807", "-9223372036854775808", "99999999999999999999", "abc", "true", "[1, 2]",
              ".nan", "''"]
FLOAT_VALUES = ["0", "-1", "1e308", "-1e308", ".nan", ".inf", "-.inf", "1e-320", "abc", "[1]", "true", "''"]
BOOL_VALUES = ["2", "maybe", "''", "[true]", "1.5"]
TEXT_VALUES = ["''", "nonsense", "123", "[a, b]", "{a: 1}", "-1"]


def config_keys(suite):
    r = suite.moetrain("config", "show", TINY)
    keys, section = [], None
    for line in r.out.splitlines():
        m = re.match(r"^(\w+):\s*$", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^  (\w+): ?(.*)$", line)
        if m and section:
            keys.append((f"{section}.{m.group(1)}", m.group(2)))
    return keys


def value_pool(current):
    if current in ("true", "false"):
        return BOOL_VALUES
    if re.fullmatch(r"-?\d+", current):
        return INT_VALUES
    if re.fullmatch(r"-?[\d.]+(e[-+]?\d+)?", current):
        return FLOAT_VALUES
    return TEXT_VALUES


def yaml_mutation(rng, text):
    lines = text.splitlines(keepends=True)
    kind = rng.choice(["truncate", "drop_line", "duplicate_line", "tab", "second_document", "unknown_key",
                       "garbage", "bad_value", "deep_indent"])
    i = rng.randrange(len(lines))
    if kind == "truncate":
        return kind, text[:rng.randrange(1, len(text))]
    if kind == "drop_line":
        return kind, "".join(lines[:i] + lines[i + 1:])
    if kind == "duplicate_line":
        return kind, "".join(lines[:i + 1] + [lines[i]] + lines[i + 1:])
    if kind == "tab":
        return kind, "".join(lines[:i] + ["\t" + lines[i]] + lines[i + 1:])
    if kind == "second_document":
        return kind, text + "---\ntrain:\n  steps: 1\n"
    if kind == "unknown_key":
        return kind, text + "train:\n  step_count: 3\n"
    if kind == "garbage":
        at = rng.randrange(len(text))
        return kind, text[:at] + "".join(chr(rng.randrange(33, 127)) for _ in range(6)) + text[at:]
    if kind == "bad_value":
        return kind, "".join(lines[:i] + [re.sub(r":\s.*$", ": [", lines[i])] + lines[i + 1:])
    return kind, "".join(lines[:i] + ["      " + lines[i]] + lines[i + 1:])


def kind_config(suite, cases):
    keys = config_keys(suite)
    if len(keys) < 40:
        suite.case([], "config show lists the keys", [f"only {len(keys)} keys parsed from config show"])
        return
    runs = suite.new_dir("runs")
    for _ in range(cases):
        key, current = suite.rng.choice(keys)
        value = suite.rng.choice(value_pool(current))
        setting = f"{key}={value}"
        r = suite.moetrain("config", "check", TINY, "--set", setting, timeout=30)
        if r.rc == 0:
            # Accepted: `plan` must work on it too (it once printed negative counts or looped for ever).
            p = suite.moetrain("plan", TINY, "--set", setting, timeout=30)
            problems = suite.success(p) if p.rc == 0 else suite.clean_error(p, [re.escape(key.split(".")[1])])
            suite.case([6, 11], f"--set {setting}: accepted; plan rc {p.rc}", problems)
            continue
        problems = suite.clean_error(r, [re.escape(key.split(".")[1]) + "|" + re.escape(key.split(".")[0])])
        # train refuses it the same way, before writing anything into its run directory.
        t = suite.moetrain(*suite.train_args(runs, "refused", 1), "--set", setting, timeout=60)
        problems += suite.clean_error(t, [], stdout_allowed=False)
        if t.err.strip() != r.err.strip():
            problems.append(f"train and config check disagree: {t.err.strip()!r} vs {r.err.strip()!r}")
        if os.listdir(runs):
            problems.append(f"a refused train wrote into the run directory: {os.listdir(runs)}")
            shutil.rmtree(runs)
            os.makedirs(runs)
        suite.case([6, 11], f"--set {setting}: {r.err.strip()[:110]}", problems)

    text = open(TINY).read()
    for n in range(max(4, cases // 4)):
        kind, mutated = yaml_mutation(suite.rng, text)
        path = os.path.join(suite.tmp, f"mutated{n}.yaml")
        with open(path, "w") as f:
            f.write(mutated)
        r = suite.moetrain("config", "check", path, timeout=30)
        problems = suite.success(r) if r.rc == 0 else suite.clean_error(r, [re.escape(path)])
        suite.case([11], f"YAML {kind}: rc {r.rc} {r.err.strip()[:100]}", problems)

    # The fixed ones of audit 11: a directory for a config file, a section for --set, unknown commands.
    r = suite.moetrain("config", "check", os.path.join(ROOT, "configs"))
    suite.case([11], "a directory for a config file", suite.clean_error(r, ["is a directory"]))
    r = suite.moetrain("plan", TINY, "--set", "model=1")
    suite.case([11], "--set model=1", suite.clean_error(r, ["'model' is a section"]))
    r = suite.moetrain("frobnicate", "--help")
    suite.case([11], "an unknown command with --help", suite.clean_error(r, ["unknown command 'frobnicate'"]))


# ---- data: corrupted token shards, mismatched blends (audit 11) ---------------------------------------------
def kind_data(suite, cases):
    d = suite.new_dir("data")
    for name, vocab in (("a", 256), ("b", 64)):
        r = suite.moetrain("data", "synth", "--out", f"{d}/{name}", "--tokens", "30000", "--vocab-size", str(vocab),
                           "--doc-tokens", "200", "--no-progress")
        if r.rc != 0:
            suite.case([], f"data synth {name}", [str(r)])
            return
    runs = suite.new_dir("data-runs")

    def train_on(path, *extra):
        suite.cases_run = getattr(suite, "cases_run", 0) + 1
        return suite.moetrain(*suite.train_args(runs, f"d{suite.cases_run}", 2), *ONE_RANK, "--set", "data.source=shards",
                              "--set", f"data.path={path}", *extra, timeout=90)

    r = train_on(f"{d}/a")
    suite.case([], "the pristine shards train", suite.success(r))
    mutations = ["truncate_bin", "truncate_idx", "flip_idx", "flip_bin", "delete_idx", "delete_bin", "empty_bin",
                 "append_bin", "swap_idx"]
    for n in range(cases):
        kind = mutations[n] if n < len(mutations) else suite.rng.choice(mutations)
        c = f"{d}/c{n}"
        for ext in ("bin", "idx"):
            shutil.copy(f"{d}/a.00000.{ext}", f"{c}.00000.{ext}")
        bin_, idx = f"{c}.00000.bin", f"{c}.00000.idx"
        target = bin_ if kind.endswith("bin") else idx
        size = os.path.getsize(target)
        if kind.startswith("truncate"):
            os.truncate(target, suite.rng.randrange(size))
        elif kind.startswith("flip"):
            kind += f"@{flip_bit(suite, target)}"
        elif kind.startswith("delete"):
            os.remove(target)
        elif kind == "empty_bin":
            open(bin_, "w").close()
        elif kind == "append_bin":
            with open(bin_, "ab") as f:
                f.write(os.urandom(suite.rng.randrange(1, 64)))
        elif kind == "swap_idx":
            shutil.copy(f"{d}/b.00000.idx", idx)
        r = train_on(c)
        if r.rc == 0:
            # Accepted: only a flip inside the token payload may be, and then it still trained to the end.
            problems = [] if kind.startswith("flip_bin") else [f"a corrupt corpus ({kind}) was accepted: {r}"]
            problems += suite.success(r)
        else:
            problems = suite.clean_error(r, [re.escape(c)], stdout_allowed=True)
        suite.case([11], f"shards {kind}: rc {r.rc} {r.err.strip()[:100]}", problems)

    # Blends whose shards disagree on the vocabulary, and shards of a larger vocabulary than the model's.
    r = train_on(f"{d}/a=1,{d}/b=1")
    suite.case([11], "a blend of two vocabularies", suite.clean_error(r, [re.escape(f"{d}/b")], stdout_allowed=True))
    r = train_on(f"{d}/a", "--set", "model.vocab_size=128")
    suite.case([11], "shards of vocabulary 256 for a model of 128",
               suite.clean_error(r, [re.escape(f"{d}/a")], stdout_allowed=True))


# ---- checkpoint: corrupted files, a wrong index, export, failed resumes (audit 7, 8, 10, 11) ----------------
def mutate_index(rng, index):
    """One seeded edit of a parsed index.json; returns its description."""
    tensors = index["tensors"]
    name = rng.choice(sorted(tensors))
    edit = rng.choice(["drop_tensor", "drop_key", "shape", "dtype", "meta", "slice", "file", "dataset", "step",
                       "format", "shards"])
    t = tensors[name]
    if edit == "drop_tensor":
        del tensors[name]
    elif edit == "drop_key":
        key = rng.choice(sorted(t))
        del t[key]
        return f"{name}: no '{key}'"
    elif edit == "shape":
        t["shape"][rng.randrange(len(t["shape"]))] += rng.choice([-1, 1, 7]) if t["shape"] else 0
        if not t["shape"]:
            t["shape"] = [2]
    elif edit == "dtype":
        t["dtype"] = rng.choice(["float64", "bfloat16", "int8", "complex"])
    elif edit == "meta":
        key = rng.choice(sorted(index["meta"]))
        index["meta"][key] = rng.choice([None, 7, "x", [], {}])
        return f"meta.{key}"
    elif edit == "slice":
        t["parts"][0]["slice"][0][1] += 1
    elif edit == "file":
        t["parts"][0]["file"] = "shard_00009.h5"
    elif edit == "dataset":
        t["parts"][0]["dataset"] = "/model/nothing"
    elif edit == "step":
        index["step"] = -5
        return "step"
    elif edit == "format":
        index["format"] = "moetrain-checkpoint-1"
        return "format"
    elif edit == "shards":
        index["shards"] = 3
        return "shards"
    return f"{name}: {edit}"


def kind_checkpoint(suite, cases):
    runs = suite.new_dir("ck-runs")
    base = suite.train_args(runs, "src", 2, *ONE_RANK, "--set", "checkpoint.interval=2")
    r = suite.moetrain(*base, timeout=120)
    src = os.path.join(runs, "src", "checkpoints")
    if r.rc != 0:
        suite.case([], "the source checkpoint", [str(r)])
        return
    pristine = suite.digest(src)
    # The reference: the pristine checkpoint resumed for one step.
    ref_dir = suite.new_dir("ck-ref")
    shutil.copytree(os.path.join(runs, "src"), os.path.join(ref_dir, "r"))
    r = suite.moetrain(*suite.train_args(ref_dir, "r", 3, *ONE_RANK, "--set", "checkpoint.interval=0"), "--resume",
                       "auto", timeout=120)
    reference = suite.step_losses(os.path.join(ref_dir, "r", "metrics.jsonl")).get(3)
    suite.case([], "the pristine checkpoint resumes", suite.success(r) + ([] if reference else ["no step 3"]))

    step_dir = "step_0000002"
    files = sorted(os.listdir(os.path.join(src, step_dir)))
    for n in range(cases):
        work = suite.new_dir(f"ck{n}")
        run = os.path.join(work, "r")
        shutil.copytree(os.path.join(runs, "src"), run)
        ck = os.path.join(run, "checkpoints")
        sd = os.path.join(ck, step_dir)
        kind = suite.rng.choice(["flip", "flip", "flip", "index", "index", "index", "index", "truncate", "delete"])
        f = suite.rng.choice(files)
        path = os.path.join(sd, f)
        if kind == "flip":
            what = f"flip {f}@{flip_bit(suite, path)}"
        elif kind == "index":
            path = os.path.join(sd, "index.json")
            index = json.load(open(path))
            what = "index.json " + mutate_index(suite.rng, index)
            with open(path, "w") as fh:
                json.dump(index, fh, indent=1)
        elif kind == "truncate":
            os.truncate(path, suite.rng.randrange(os.path.getsize(path)))
            what = f"truncate {f}"
        else:
            os.remove(path)
            what = f"delete {f}"
        config_before = open(os.path.join(run, "config.yaml")).read()
        v = suite.moetrain("ckpt", "verify", ck, timeout=60)
        t = suite.moetrain(*suite.train_args(work, "r", 3, *ONE_RANK, "--set", "checkpoint.interval=0"), "--resume",
                           "auto", timeout=120)
        problems = []
        if v.rc == 0:
            # Verified: the change was harmless (e.g. a flip in unused bytes); the resume gives the same numbers.
            problems += suite.success(t)
            got = suite.step_losses(os.path.join(run, "metrics.jsonl")).get(3)
            if got != reference:
                problems.append(f"verified but resumed to {got}, not {reference}")
        else:
            named = [re.escape(f if kind != "index" else "index.json") + "|" + re.escape(sd)]
            problems += suite.clean_error(v, named)
            problems += suite.clean_error(t, named, stdout_allowed=True)
            if open(os.path.join(run, "config.yaml")).read() != config_before:
                problems.append("the failed resume rewrote config.yaml")
        audit = ([7] if kind == "index" else []) + ([10] if v.rc else [])  # 10: config.yaml after a failed resume
        suite.case(audit, f"{what}: verify rc {v.rc}, resume rc {t.rc}: {v.err.strip()[:100]}", problems)

    # Export onto the checkpoint's own files (audit 8), with --out naming a shard, the index, the step directory.
    for target in (f"{step_dir}/shard_00000.h5", f"{step_dir}/index.json", step_dir, "latest"):
        r = suite.moetrain("ckpt", "export", src, "--out", os.path.join(src, target))
        suite.case([8], f"export --out CK/{target}", suite.clean_error(r, [re.escape(os.path.join(src, target))]))
    # `latest` naming an uncommitted step_N.tmp, and --resume of one (audit 11).
    work = suite.new_dir("ck-tmp")
    shutil.copytree(os.path.join(runs, "src"), os.path.join(work, "r"))
    ck = os.path.join(work, "r", "checkpoints")
    os.rename(os.path.join(ck, step_dir), os.path.join(ck, step_dir + ".tmp"))
    with open(os.path.join(ck, "latest"), "w") as fh:
        fh.write(step_dir + ".tmp\n")
    for args in (["ckpt", "verify", ck],
                 [*suite.train_args(work, "r", 3, *ONE_RANK), "--resume", os.path.join(ck, step_dir + ".tmp")]):
        r = suite.moetrain(*args, timeout=60)
        suite.case([11], f"{args[0]} of an uncommitted step_N.tmp",
                   suite.clean_error(r, [re.escape(step_dir + ".tmp")], stdout_allowed=args[0] == "train"))
    # A resume onto another model shape fails and leaves config.yaml as it was (audit 10).
    work = suite.new_dir("ck-shape")
    shutil.copytree(os.path.join(runs, "src"), os.path.join(work, "r"))
    before = open(os.path.join(work, "r", "config.yaml")).read()
    r = suite.moetrain(*suite.train_args(work, "r", 3, *ONE_RANK, "--set", "model.hidden_size=32"), "--resume",
                       "auto", timeout=60)
    problems = suite.clean_error(r, ["has shape"], stdout_allowed=True)
    if open(os.path.join(work, "r", "config.yaml")).read() != before:
        problems.append("the failed resume rewrote config.yaml")
    suite.case([10], "a resume onto another model shape", problems)
    # Nothing of this touched the source checkpoint.
    suite.case([], "the source checkpoint is byte for byte as saved",
               [] if suite.digest(src) == pristine else ["the source checkpoint changed"])


# ---- kill: kill -9 during saves (every moment leaves a verifiable latest and a bit-identical resume) --------
def rank_pids(marker):
    """PIDs of the moetrain ranks whose command line holds marker, by world rank."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if marker.encode() not in b" ".join(cmd) or not cmd[0].endswith(b"moetrain"):
            continue
        for e in env:
            if e.startswith(b"OMPI_COMM_WORLD_RANK="):
                out[int(e.split(b"=")[1])] = int(pid)
    return out


def wait_for_steps(metrics, n, proc, timeout=120):
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            with open(metrics) as f:
                if sum('"lm_loss"' in l for l in f) >= n:
                    return True
        except OSError:
            pass
        time.sleep(0.02)
    return False


def start(suite, np, args, log):
    return subprocess.Popen([LAUNCH, "-np", str(np), "--", suite.bin, *args], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def end(proc, timeout):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return 124


def kind_kill(suite, cases):
    steps = 8
    runs = suite.new_dir("kill-runs")
    two = ["--set", "parallel.pp=1", "--set", "parallel.ep=2", "--set", "parallel.dp=2",
           "--set", "checkpoint.interval=1", "--set", "checkpoint.keep_last=2"]
    r = suite.mpi(2, *suite.train_args(runs, "ref", steps, *two), timeout=180)
    reference = suite.step_losses(os.path.join(runs, "ref", "metrics.jsonl"))
    suite.case([], "the uninterrupted 2-rank run", suite.success(r) + ([] if len(reference) == steps else
                                                                        [f"{len(reference)} steps"]))
    for n in range(cases):
        name = f"k{n}"
        after = suite.rng.randrange(1, steps - 1)
        delay = suite.rng.uniform(0, 0.3)
        victim = ["every rank", "rank 0", "rank 1"][n % 3]  # one rank: mpirun ends the other
        with open(os.path.join(runs, f"{name}.log"), "w") as log:
            proc = start(suite, 2, suite.train_args(runs, name, steps, *two), log)
            wait_for_steps(os.path.join(runs, name, "metrics.jsonl"), after, proc)
            time.sleep(delay)
            pids = rank_pids(f"logging.name={name} ")
            if victim == "every rank":
                os.killpg(proc.pid, signal.SIGKILL)
                for pid in pids.values():
                    os.kill(pid, signal.SIGKILL)
            elif int(victim[-1]) in pids:
                os.kill(pids[int(victim[-1])], signal.SIGKILL)
            end(proc, 60)
        ck = os.path.join(runs, name, "checkpoints")
        problems = []
        if os.path.exists(os.path.join(ck, "latest")):
            v = suite.moetrain("ckpt", "verify", ck)
            problems += [f"latest does not verify: {v}"] if v.rc else []
        r = suite.mpi(2, *suite.train_args(runs, name, steps, *two), "--resume", "auto", timeout=180)
        problems += suite.success(r)
        got = suite.step_losses(os.path.join(runs, name, "metrics.jsonl"))
        if got.get(steps) != reference.get(steps):
            problems.append(f"step {steps} after the resume: {got.get(steps)}, uninterrupted {reference.get(steps)}")
        resumed = re.search(r"resumed from \S+ at step (\d+)", r.out)
        suite.case([], f"kill -9 {victim} after step {after} + {delay:.2f} s: resumed at step "
                   f"{resumed.group(1) if resumed else 'none (fresh)'}", problems)


# ---- ranks: killed and stopped ranks, two jobs on one directory, --resume auto, launch misuse (3, 4, 5, 9) ---
def kind_ranks(suite, cases):
    runs = suite.new_dir("rank-runs")
    victims = {w: suite.rng.sample(range(4), 4) for w in ("kill", "stop")}  # every rank in turn, seeded order
    for n in range(cases):
        what = ["kill", "stop"][n % 2]
        victim = victims[what][(n // 2) % 4]
        after = suite.rng.randrange(1, 4)
        name = f"{what}{n}"
        log_path = os.path.join(runs, f"{name}.log")
        with open(log_path, "w") as log:
            proc = start(suite, 4, suite.train_args(runs, name, 100000, "--set", "parallel.comm_timeout_s=3"), log)
            wait_for_steps(os.path.join(runs, name, "metrics.jsonl"), after, proc)
            pids = rank_pids(f"logging.name={name}")
            t0 = time.monotonic()
            if victim in pids:
                os.kill(pids[victim], signal.SIGKILL if what == "kill" else signal.SIGSTOP)
            rc = end(proc, 90)
            elapsed = time.monotonic() - t0
            for pid in rank_pids(f"logging.name={name}").values():  # the stopped one, if it outlived the job
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
        out = open(log_path).read()
        err = "\n".join(l for l in out.splitlines() if not l.startswith(("step ", "training ", "checkpoint ")))
        r = Result(rc, "", err, elapsed)
        if victim not in pids:
            problems = [f"rank {victim} was not found"]
        elif what == "kill":
            problems = [] if rc not in (0, 124) else [f"the job did not end: {r}"]
            if not re.search(r"a rank ended by SIGKILL|moetrain: error", err):
                problems.append(f"no message: {r}")
            if BACKTRACE.search(err):
                problems.append(f"a crash or library noise: {r}")
        else:
            problems = suite.clean_error(r, [rf"world rank {victim} did not answer within 3 s: stopped or hung"],
                                         ranks=True)
        if elapsed > 60:
            problems.append(f"took {elapsed:.0f} s to end")
        ck = os.path.join(runs, name, "checkpoints")
        if os.path.exists(os.path.join(ck, "latest")):
            v = suite.moetrain("ckpt", "verify", ck)
            problems += [f"latest does not verify: {v}"] if v.rc else []
        suite.case([5] if what == "kill" else [9], f"{what} rank {victim} after step {after}: ended in "
                   f"{elapsed:.1f} s, rc {rc}: {err.strip().splitlines()[-1][:120] if err.strip() else ''}",
                   problems)

    # Two jobs on one run directory: the second is refused naming the first; the first goes on and stops cleanly.
    with open(os.path.join(runs, "first.log"), "w") as log:
        first = start(suite, 2, suite.train_args(runs, "shared", 100000, "--set", "parallel.pp=1", "--set",
                                                 "parallel.ep=2", "--set", "checkpoint.interval=2"), log)
        wait_for_steps(os.path.join(runs, "shared", "metrics.jsonl"), 1, first)
        problems = []
        for how in ([], ["--resume", "auto"], ["--overwrite"]):
            second = suite.mpi(2, *suite.train_args(runs, "shared", 100000, "--set", "parallel.pp=1", "--set",
                                                    "parallel.ep=2"), *how, timeout=60)
            problems += suite.clean_error(second, [rf"{re.escape(runs)}/shared: the run directory is in use by "
                                                   r"another job \(pid \d+ on "])
        wait_for_steps(os.path.join(runs, "shared", "metrics.jsonl"), 5, first)
        os.kill(first.pid, signal.SIGUSR1)  # to launch/mpirun.sh, which passes it on: every rank saves and stops
        rc = end(first, 60)
    if rc != 0:
        problems.append(f"the first job did not stop cleanly: rc {rc}: {open(os.path.join(runs, 'first.log')).read()[-400:]}")
    metrics = os.path.join(runs, "shared", "metrics.jsonl")
    try:
        steps = [json.loads(l).get("step") for l in open(metrics)]
        if [s for s in steps if s is not None] != sorted(s for s in steps if s is not None):
            problems.append("metrics.jsonl steps out of order")
    except ValueError as e:
        problems.append(f"metrics.jsonl has a garbled line: {e}")
    v = suite.moetrain("ckpt", "verify", os.path.join(runs, "shared", "checkpoints"))
    problems += [f"latest does not verify: {v}"] if v.rc else []
    suite.case([3], "two jobs on one run directory", problems)

    # --resume auto on a run with metrics but no checkpoint: starts fresh (the help says so).
    args = suite.train_args(runs, "nock", 2, *ONE_RANK, "--set", "checkpoint.interval=0")
    first = suite.moetrain(*args)
    again = suite.moetrain(*args, "--resume", "auto")
    problems = suite.success(first) + suite.success(again)
    if "no checkpoint" not in again.out:
        problems.append(f"no word of starting fresh: {again.out[-300:]!r}")
    suite.case([4], "--resume auto with metrics and no checkpoint", problems)

    # Launch misuse: two -np; a rank that dies without a word is reported.
    r = suite.run([LAUNCH, "-np", "2", "-np", "4", "--", suite.bin, "version"])
    suite.case([5], "two -np", [] if r.rc == 2 and "-np given twice" in r.err else [str(r)])


KINDS = {"config": (kind_config, 24), "data": (kind_data, 14), "checkpoint": (kind_checkpoint, 18),
         "kill": (kind_kill, 3), "ranks": (kind_ranks, 4)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("moetrain")
    ap.add_argument("kind", choices=sorted(KINDS))
    ap.add_argument("--seed", type=int, default=int(os.environ.get("FAULT_SEED", "1")))
    ap.add_argument("--cases", type=int, help="cases drawn (default: the kind's own)")
    a = ap.parse_args()
    if os.geteuid() == 0:
        os.environ.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    fn, default_cases = KINDS[a.kind]
    with tempfile.TemporaryDirectory(prefix=f"faults-{a.kind}-") as tmp:
        suite = Suite(os.path.abspath(a.moetrain), a.kind, a.seed, tmp)
        fn(suite, a.cases or default_cases)
        return suite.summary()


if __name__ == "__main__":
    sys.exit(main())
