"""Property-based fuzzing (hypothesis) of what ppl-vae reads from disk: IDX files and config.json.

Every outcome must be a clean result or the one user error of the format, on one line, naming
the file: never a traceback of another exception type. ``derandomize=True`` makes every run
draw the same examples, so CI is deterministic.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ppl_vae import data, runs
from ppl_vae.cli import main
from ppl_vae.config import RunConfig, to_dict
from ppl_vae.errors import DataError, RunDirError


def fuzz(max_examples: int) -> settings:
    """Deterministic settings: the same examples on every run, no example database."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder for every example (hypothesis reruns the test body; function-scoped
    ``tmp_path`` would be shared between examples anyway)."""
    return tmp_path_factory.mktemp("fuzz")


def one_line_naming(err: Exception, path: Path) -> None:
    message = str(err)
    assert "\n" not in message and "\r" not in message, message
    assert str(path) in message, message


# ----------------------------------------------------------------------------- IDX files


def valid_idx(shape: tuple[int, ...], seed: int = 0) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    array = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    header = struct.pack(">HBB", 0, data.IDX_UBYTE, len(shape)) + struct.pack(
        f">{len(shape)}I", *shape
    )
    return header + array.numpy().tobytes()


PLAIN = valid_idx((3, 4, 5))
GZ = gzip.compress(PLAIN, mtime=0)


def check_read(path: Path, payload: bytes) -> None:
    """``read_idx`` of ``payload`` written to ``path``: a uint8 tensor that writes back to the
    same IDX bytes, or a one-line DataError naming the file."""
    path.write_bytes(payload)
    try:
        tensor = data.read_idx(path)
    except DataError as err:
        one_line_naming(err, path)
        return
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.uint8
    plain = gzip.decompress(payload) if path.suffix == ".gz" else payload
    assert valid_idx_of(tensor) == plain


def valid_idx_of(tensor: torch.Tensor) -> bytes:
    header = struct.pack(">HBB", 0, data.IDX_UBYTE, tensor.dim())
    return header + struct.pack(f">{tensor.dim()}I", *tensor.shape) + tensor.numpy().tobytes()


def mutate(payload: bytes, flips: list[int], cut: int | None, tail: bytes) -> bytes:
    """``payload`` with the bits ``flips`` (indices modulo its bit length) flipped, cut to
    ``cut`` bytes, and ``tail`` appended."""
    out = bytearray(payload)
    for bit in flips:
        bit %= 8 * len(out)
        out[bit // 8] ^= 1 << (bit % 8)
    if cut is not None:
        out = out[: cut % (len(out) + 1)]
    return bytes(out) + tail


@fuzz(300)
@given(payload=st.binary(max_size=300), gz=st.booleans())
@example(payload=b"", gz=False)
@example(payload=b"", gz=True)
@example(payload=b"\x1f\x8b", gz=True)
def test_read_idx_of_random_bytes(scratch, payload, gz):
    check_read(scratch / ("random.gz" if gz else "random"), payload)


@fuzz(400)
@given(
    gz=st.booleans(),
    flips=st.lists(st.integers(min_value=0, max_value=10**6), max_size=4),
    cut=st.none() | st.integers(min_value=0, max_value=10**4),
    tail=st.binary(max_size=8),
)
@example(gz=True, flips=[], cut=None, tail=b"")  # the valid files themselves read back
@example(gz=False, flips=[], cut=None, tail=b"")
@example(gz=True, flips=[], cut=len(GZ) - 4, tail=b"")  # gzip trailer (size) cut off
@example(gz=True, flips=[], cut=None, tail=b"\x1f\x8b")  # a second, truncated gzip member
@example(gz=True, flips=[8 * (len(GZ) - 1)], cut=None, tail=b"")  # wrong ISIZE
@example(gz=True, flips=[8 * (len(GZ) - 6)], cut=None, tail=b"")  # wrong CRC
@example(gz=False, flips=[], cut=None, tail=b"\x00")  # one byte too many
@example(gz=False, flips=[8 * 3 + 0], cut=None, tail=b"")  # ndim 3 -> 2
def test_read_idx_of_mutated_valid_files(scratch, gz, flips, cut, tail):
    base = GZ if gz else PLAIN
    check_read(scratch / ("mutated.gz" if gz else "mutated"), mutate(base, flips, cut, tail))


@fuzz(400)
@given(
    zero=st.sampled_from([0, 0, 0, 1, 0x0800, 0xFFFF]),
    dtype=st.sampled_from([data.IDX_UBYTE] * 4 + [0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0, 0xFF]),
    ndim=st.integers(min_value=0, max_value=255),
    dims=st.lists(
        st.integers(min_value=0, max_value=6) | st.integers(min_value=0, max_value=2**32 - 1),
        max_size=6,
    ),
    extra=st.integers(min_value=-3, max_value=3),
    gz=st.booleans(),
)
@example(zero=0, dtype=8, ndim=4, dims=[2**32 - 1] * 4, extra=0, gz=False)  # 2^128 elements
@example(zero=0, dtype=8, ndim=1, dims=[0], extra=0, gz=False)
@example(zero=0, dtype=8, ndim=2, dims=[1], extra=0, gz=False)  # header shorter than ndim says
def test_read_idx_of_random_headers(scratch, zero, dtype, ndim, dims, extra, gz):
    """Headers of every kind, with a payload of the size the listed dims need (± a few)."""
    header = struct.pack(">HBB", zero, dtype, ndim) + b"".join(struct.pack(">I", d) for d in dims)
    size = math.prod(dims[:ndim]) if dims else 0
    payload = bytes((i * 37) % 256 for i in range(max(0, min(size, 4096) + extra)))
    raw = header + payload
    check_read(scratch / ("header.gz" if gz else "header"), gzip.compress(raw) if gz else raw)


def test_read_idx_errors_name_the_file_for_missing_and_folder(scratch):
    for path in (scratch / "no-such-file", scratch):
        with pytest.raises(DataError) as info:
            data.read_idx(path)
        one_line_naming(info.value, path)


# ----------------------------------------------------------------------------- config.json


JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["", ".", "..", "a/b", "~nosuchuser/x", "~", "\0", "NaN", "vae", "cpu"])
)
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
VALID = to_dict(RunConfig())


def paths_of(tree, prefix=()):
    """Every key path into the nested dicts of ``tree``."""
    out = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.append((*prefix, key))
            out += paths_of(value, (*prefix, key))
    return out


PATHS = paths_of(VALID)


@st.composite
def mutated_config(draw) -> dict:
    """``to_dict(RunConfig())`` with a few fields replaced by junk, deleted, or joined by
    unknown ones."""
    tree = json.loads(json.dumps(VALID))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        path = draw(st.sampled_from(PATHS))
        parent = tree
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(JSON)
        elif action == "delete":
            parent.pop(path[-1], None)
        else:
            parent[draw(st.text(min_size=1, max_size=6))] = draw(JSON)
    return tree


def write_config_json(folder: Path, content) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / runs.CONFIG
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(json.dumps(content), encoding="utf-8")
    return path


def check_config(folder: Path, content) -> RunConfig | None:
    """``read_config`` of a folder whose config.json is ``content``: a RunConfig, or a
    one-line RunDirError naming config.json."""
    path = write_config_json(folder, content)
    try:
        cfg = runs.read_config(folder)
    except RunDirError as err:
        one_line_naming(err, path)
        return None
    assert isinstance(cfg, RunConfig)
    return cfg


@fuzz(400)
@given(content=JSON)
@example(content=VALID)
@example(content=[VALID])
@example(content={"train": {"epochs": 10**400}})
def test_read_config_of_arbitrary_json(scratch, content):
    cfg = check_config(scratch / "cfg-arbitrary", content)
    if content == VALID:
        assert cfg == RunConfig()


@fuzz(300)
@given(content=mutated_config())
@example(content={**VALID, "train": {**VALID["train"], "lr": 10**400}})  # int too big for a float
@example(content={**VALID, "train": {**VALID["train"], "lr": float("nan")}})
@example(content={**VALID, "eval": {**VALID["eval"], "k": 10**400}})
@example(content={**VALID, "model": {**VALID["model"], "x_scale": -(10**400)}})
@example(content={**VALID, "data": {**VALID["data"], "data_dir": "~nosuchuser/idx"}})
@example(content={**VALID, "runs_dir": "~nosuchuser"})
@example(content={**VALID, "model": {**VALID["model"], "kind": ["vae"]}})
@example(content={**VALID, "model": {**VALID["model"], "hidden": [10**400]}})
@example(content={**VALID, "model": {**VALID["model"], "hidden": None}})
@example(content={**VALID, "name": "\ud800"})
def test_read_config_of_mutated_valid_config(scratch, content):
    cfg = check_config(scratch / "cfg-mutated", content)
    if cfg is not None:  # what was accepted survives the round trip through config.json
        assert check_config(scratch / "cfg-mutated", json.loads(runs.config_text(cfg))) == cfg


@fuzz(100)
@given(content=st.binary(max_size=200))
@example(content=b"\xff\xfe{}")
@example(content=b'{"name": "\xe9"}')
@example(content=b"[" * 100_000)  # deeper than the JSON decoder's recursion limit
@example(content=b'{"a":' * 100_000)
@example(content=b"")
@example(content=b'{"train": {"epochs": 1' + b"0" * 5000 + b"}}")  # beyond int()'s 4300 digits
def test_read_config_of_raw_bytes(scratch, content):
    check_config(scratch / "cfg-raw", content)


@fuzz(8)
@given(content=mutated_config() | JSON)
@example(content=b"[" * 100_000)
@example(content={**VALID, "train": {**VALID["train"], "lr": 10**400}})
def test_cli_evaluate_with_fuzzed_config_exits_2(scratch, content):
    """The whole CLI in-process: one line on stderr naming config.json (or, for a config that
    happens to be valid, the missing checkpoint), exit code 2, nothing computed."""
    folder = scratch / "cfg-cli"
    write_config_json(folder, content)
    (folder / runs.CHECKPOINT).unlink(missing_ok=True)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["evaluate", str(folder)])
    out, err = out.getvalue(), err.getvalue()
    assert code == 2, err
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("ppl-vae evaluate: error: "), err
    assert str(folder / runs.CONFIG) in err or str(folder / runs.CHECKPOINT) in err, err
    assert not (folder / "eval.json").exists()


def test_mutations_reach_deep_fields():
    """The mutation strategy's paths cover every nested config (a strategy that only touched
    top-level keys would test little)."""
    heads = {p[0] for p in PATHS if len(p) > 1}
    assert heads >= {"model", "data", "train", "objective", "eval"}
    assert {p[-1] for p in PATHS} >= {"epochs", "lr", "kind", "hidden", "data_dir", "seed"}
