"""BuildCalibLoader and its pure helpers: captions files, tokens, both batch layouts, stats."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import torch

from auto_quantize_model.artifacts import CalibData, LoadedModel
from auto_quantize_model.backend.lm_forward import as_tensors
from auto_quantize_model.core.batching import (
    MemoryBudget,
    check_calib_spec,
    check_padded_memory,
    encode,
    holdout_columns,
    pack_rows,
    packed_columns,
    pad_token_id,
    padded_columns,
    padded_memory,
    scorable,
    tokenize_captions,
    truncate,
)
from auto_quantize_model.core.captions import (
    captions_label,
    captions_sha256,
    parse_captions,
    read_captions,
)
from auto_quantize_model.errors import AqmError, ConfigError, InputError, WiringError
from auto_quantize_model.pipeline import Artifacts, Stage, check_wiring
from auto_quantize_model.specs import CalibSpec
from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader, make_calib_data
from fakes import FakeTokenizer

if TYPE_CHECKING:
    import torch

PAD = 0
X = -100  # IGNORE_INDEX, short so expected tensors stay readable

Batch = dict[str, torch.Tensor]


def packed_batches(
    token_lists: Sequence[Sequence[int]], seq_len: int, batch_size: int, pad_id: int
) -> tuple[list[Batch], list[int]]:
    """The packed layout as the stage hands it on: pure rows turned into int64 tensors."""
    columns, counts = packed_columns(token_lists, seq_len, batch_size, pad_id)
    assert all(isinstance(row, list) for c in columns for rows_ in c.values() for row in rows_)  # plain data
    return [as_tensors(c) for c in columns], counts


def padded_batches(
    token_lists: Sequence[Sequence[int]], seq_len: int, batch_size: int, pad_id: int
) -> tuple[list[Batch], list[int]]:
    columns, counts = padded_columns(token_lists, seq_len, batch_size, pad_id)
    return [as_tensors(c) for c in columns], counts


def write(tmp_path: Path, content: str | bytes, name: str = "captions.txt") -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def rows(batch: dict[str, torch.Tensor], key: str) -> list[list[int]]:
    value = batch[key].tolist()
    assert isinstance(value, list)
    return value


# --------------------------------------------------------------------------- captions files


def test_read_captions_keeps_order_skips_blank_lines_and_takes_the_first(tmp_path: Path) -> None:
    path = write(tmp_path, "\ufeffa red bus\r\n\n   \n  two dogs  \nthe sea\n\nlast one")
    assert read_captions(path, 3) == ("a red bus", "two dogs", "the sea")
    assert read_captions(str(path), 4) == ("a red bus", "two dogs", "the sea", "last one")


def test_parse_captions_on_plain_text() -> None:
    assert parse_captions("x\n\ny\t\n") == ["x", "y"]
    assert parse_captions("") == []


@pytest.mark.parametrize(
    ("content", "kind", "words"),
    [
        (b"", InputError, ["is empty"]),
        (b"\n  \n\t\n", InputError, ["only blank lines"]),
        (b"fine\nbad \xff byte\n", InputError, ["not UTF-8", "0xff", "offset 9"]),
        (
            b"one\ntwo\n",
            ConfigError,
            ["holds 2 captions", "max_samples asks for 3", "lower calib.max_samples"],
        ),
    ],
)
def test_read_captions_errors_name_the_file(
    tmp_path: Path, content: bytes, kind: type[AqmError], words: list[str]
) -> None:
    path = write(tmp_path, content)
    with pytest.raises(kind) as err:
        read_captions(path, 3)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message


def test_read_captions_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist") as err:
        read_captions(tmp_path / "nope.txt", 1)
    assert "nope.txt" in str(err.value)
    with pytest.raises(InputError, match="is a directory"):
        read_captions(tmp_path, 1)


@pytest.mark.parametrize("max_samples", [0, -3])
def test_read_captions_rejects_non_positive_max_samples(tmp_path: Path, max_samples: int) -> None:
    with pytest.raises(ConfigError, match=r"calib\.max_samples"):
        read_captions(write(tmp_path, "a\n"), max_samples)


def test_builtin_captions_are_package_data_and_cover_the_default_max_samples() -> None:
    captions = read_captions("builtin", CalibSpec().max_samples)
    assert len(captions) == CalibSpec().max_samples
    assert all(c and c == c.strip() for c in captions)
    assert captions_label("builtin") == "builtin"


def test_captions_sha256_is_the_file_hash_for_a_clean_file(tmp_path: Path) -> None:
    path = write(tmp_path, "a red bus\ntwo dogs\n")
    captions = read_captions(path, 2)
    assert captions_sha256(captions) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert captions_sha256(captions[::-1]) != captions_sha256(captions)
    assert captions_label(path) == str(path.resolve())


# --------------------------------------------------------------------------- tokens


def test_tokenize_captions_adds_no_special_tokens() -> None:
    tok = FakeTokenizer()
    assert tokenize_captions(tok, ["a b", "b c d"]) == [[10, 11], [11, 12, 13]]
    assert tok.calls == [{"texts": ["a b", "b c d"], "add_special_tokens": False}]


def test_tokenize_captions_refuses_a_caption_without_tokens() -> None:
    with pytest.raises(InputError, match="caption #2"):
        tokenize_captions(FakeTokenizer(), ["a", "   "])


def test_pad_token_id_falls_back_to_the_config_then_eos_and_refuses_neither() -> None:
    """One rule for every padding (calibration, held-out rows, scoring limits): pad, config, eos."""
    tok = FakeTokenizer()
    tok.pad_token_id = 7
    assert pad_token_id(tok) == 7
    tok.pad_token_id = None
    assert pad_token_id(tok) == 2
    text_config = SimpleNamespace(pad_token_id=5)
    config = SimpleNamespace(pad_token_id=6, get_text_config=lambda: text_config)
    assert pad_token_id(tok, config) == 5
    text_config.pad_token_id = None
    assert pad_token_id(tok, config) == 6
    tok.eos_token_id = None
    with pytest.raises(InputError, match=r"set pad_token in tokenizer_config\.json"):
        pad_token_id(tok)
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=[4, 9])) == 4


def test_truncate_counts_only_captions_longer_than_seq_len() -> None:
    cut, count = truncate([[1, 2, 3], [4, 5, 6, 7], [8]], 3)
    assert cut == [[1, 2, 3], [4, 5, 6], [8]]
    assert count == 1


# --------------------------------------------------------------------------- packing


def test_pack_rows_is_greedy_in_order_and_never_splits() -> None:
    assert pack_rows([3, 4, 2, 5, 1], 8) == [[0, 1], [2, 3, 4]]
    assert pack_rows([8, 1, 8], 8) == [[0], [1], [2]]  # exactly seq_len fills a row alone
    assert pack_rows([2, 7, 2], 8) == [[0], [1], [2]]  # order kept even when a later caption would fit
    assert pack_rows([], 8) == []


@pytest.mark.parametrize("lengths", [[3, 9], [0]])
def test_pack_rows_refuses_untruncated_or_empty_captions(lengths: list[int]) -> None:
    with pytest.raises(ValueError, match=r"expected 1\.\.8"):
        pack_rows(lengths, 8)


def test_packed_batches_layout() -> None:
    caps = [[11, 12, 13], [21, 22], [31, 32, 33, 34], [41], [51, 52, 53, 54, 55, 56]]
    batches, counts = packed_batches(caps, seq_len=6, batch_size=2, pad_id=PAD)
    # rows: [c0 c1] (5 tokens), [c2 c3] (5), [c4] (6) -> batches of 2 rows and 1 row
    assert counts == [4, 1]
    first, second = batches
    assert set(first) == {"input_ids", "position_ids", "labels"}  # no attention_mask: see calib docstring
    assert all(t.dtype == torch.int64 and t.device.type == "cpu" for b in batches for t in b.values())
    assert rows(first, "input_ids") == [[11, 12, 13, 21, 22], [31, 32, 33, 34, 41]]
    assert rows(first, "position_ids") == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert rows(first, "labels") == [[X, 12, 13, X, 22], [X, 32, 33, 34, X]]
    assert rows(second, "input_ids") == [[51, 52, 53, 54, 55, 56]]
    assert rows(second, "position_ids") == [[0, 1, 2, 3, 4, 5]]
    assert rows(second, "labels") == [[X, 52, 53, 54, 55, 56]]


def test_packed_rows_pad_to_the_longest_row_of_their_batch_with_their_own_segment() -> None:
    caps = [[1, 2, 3, 4], [5, 6], [7, 8, 9], [10]]
    (batch,), counts = packed_batches(caps, seq_len=5, batch_size=4, pad_id=PAD)
    # rows: [c0] (4), [c1 c2] (5), [c3] (1); width 5
    assert counts == [4]
    assert rows(batch, "input_ids") == [[1, 2, 3, 4, PAD], [5, 6, 7, 8, 9], [10, PAD, PAD, PAD, PAD]]
    assert rows(batch, "position_ids") == [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2], [0, 0, 1, 2, 3]]
    assert rows(batch, "labels") == [[X, 2, 3, 4, X], [X, 6, X, 8, 9], [X, X, X, X, X]]


def test_packed_segments_as_transformers_sees_them() -> None:
    """transformers splits sequences where position_ids do not step by +1: each caption and each
    padding run must come out as its own segment."""
    from transformers.masking_utils import find_packed_sequence_indices

    caps = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10, 11], [12, 13]]
    (batch,), _ = packed_batches(caps, seq_len=7, batch_size=3, pad_id=PAD)
    # rows: [c0 c1 c2] (6 tokens + 1 padding), [c3 c4] (7)
    assert rows(batch, "position_ids") == [[0, 1, 2, 0, 0, 1, 0], [0, 1, 2, 3, 4, 0, 1]]
    segments = find_packed_sequence_indices(batch["position_ids"])
    assert segments is not None
    assert segments.tolist() == [[0, 0, 0, 1, 2, 2, 3], [0, 0, 0, 0, 0, 1, 1]]


def test_padded_batches_layout() -> None:
    caps = [[11, 12, 13], [21], [31, 32, 33, 34]]
    batches, counts = padded_batches(caps, seq_len=4, batch_size=2, pad_id=PAD)
    assert counts == [2, 1]
    first, second = batches
    assert set(first) == {"input_ids", "attention_mask", "position_ids", "labels"}
    assert all(t.dtype == torch.int64 for b in batches for t in b.values())
    assert rows(first, "input_ids") == [[11, 12, 13, PAD], [21, PAD, PAD, PAD]]
    assert rows(first, "attention_mask") == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert rows(first, "position_ids") == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert rows(first, "labels") == [[11, 12, 13, X], [21, X, X, X]]
    assert rows(second, "input_ids") == [[31, 32, 33, 34]]
    assert rows(second, "attention_mask") == [[1, 1, 1, 1]]


def test_padded_batches_refuse_untruncated_captions() -> None:
    with pytest.raises(ValueError, match="truncate first"):
        padded_batches([[1, 2, 3]], seq_len=2, batch_size=1, pad_id=PAD)


# --------------------------------------------------------------------------- stats


def calib(caps: Sequence[Sequence[int]], **spec: Any) -> CalibData:
    return make_calib_data(
        caps, CalibSpec(**spec), pad_id=PAD, captions_path="/data/c.txt", captions_sha256="abc"
    )


def test_stats_packed_with_exact_and_overlong_captions() -> None:
    caps = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [11], [12, 13]]  # 4 == seq_len, 6 > seq_len
    data = calib(caps, seq_len=4, batch_size=2, max_samples=4, layout="packed")
    s = data.stats
    assert (s.samples, s.truncated_samples, s.real_tokens, s.batches, s.layout) == (
        4,
        1,
        4 + 4 + 1 + 2,
        2,
        "packed",
    )
    # rows: [c0] [c1 cut to 4] | [c2 c3] -> batch widths 4 and 3
    assert s.total_tokens == 2 * 4 + 1 * 3
    assert data.captions_per_batch == (2, 2)
    assert rows(data.batches[0], "input_ids")[1] == [5, 6, 7, 8]
    assert (s.captions_path, s.captions_sha256, s.seq_len, s.batch_size, s.max_samples) == (
        "/data/c.txt",
        "abc",
        4,
        2,
        4,
    )
    assert s.padding_fraction == 0.0


def test_stats_padded() -> None:
    caps = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [11], [12, 13]]
    data = calib(caps, seq_len=4, batch_size=3, max_samples=4, layout="padded")
    s = data.stats
    assert (s.samples, s.truncated_samples, s.real_tokens, s.total_tokens, s.batches) == (4, 1, 11, 16, 2)
    assert data.captions_per_batch == (3, 1)
    assert s.padding_fraction == pytest.approx(5 / 16)


def test_batches_are_deterministic() -> None:
    gen = torch.Generator().manual_seed(0)
    caps = [torch.randint(0, 50, (int(n),), generator=gen).tolist() for n in torch.randint(1, 20, (40,))]
    for layout in ("packed", "padded"):
        a = calib(caps, seq_len=16, batch_size=3, layout=layout)
        b = calib(caps, seq_len=16, batch_size=3, layout=layout)
        assert a.captions_per_batch == b.captions_per_batch
        assert a.stats == b.stats
        for x, y in zip(a.batches, b.batches, strict=True):
            assert x.keys() == y.keys()
            assert all(torch.equal(x[k], y[k]) for k in x)


def test_every_real_token_is_in_exactly_one_place_in_both_layouts() -> None:
    gen = torch.Generator().manual_seed(1)
    caps = [torch.randint(3, 50, (int(n),), generator=gen).tolist() for n in torch.randint(1, 12, (30,))]
    for layout in ("packed", "padded"):
        data = calib(caps, seq_len=12, batch_size=4, layout=layout)
        assert sum(data.captions_per_batch) == len(caps)
        starts = sum(
            int((b["position_ids"] == 0).logical_and(b["input_ids"] != PAD).sum()) for b in data.batches
        )
        assert starts == len(caps)
        # every caption token except a caption's first is scored once as a label
        scored = sum(int((b["labels"] != X).sum()) for b in data.batches)
        assert scored == sum(len(c) - 1 for c in caps) + (len(caps) if layout == "padded" else 0)


@pytest.mark.parametrize(
    ("field", "value"), [("seq_len", 0), ("batch_size", -1), ("max_samples", 0), ("layout", "ragged")]
)
def test_check_calib_spec(field: str, value: Any) -> None:
    # numbers are refused by CalibSpec itself where it validates them, else by the check
    with pytest.raises(ConfigError, match=rf"(calib|CalibSpec)\.{field}"):
        check_calib_spec(CalibSpec(**{field: value}))


# --------------------------------------------------------------------------- stage


def loaded_with(tokenizer: Any) -> LoadedModel:
    return LoadedModel(
        model=torch.nn.Identity(),
        tokenizer=tokenizer,
        source="fake",
        architecture="Fake",
        dtype="float32",
        device="cpu",
    )


def test_stage_builds_calib_data_from_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, "a red bus\n\ntwo dogs on grass\nthe sea\nunused caption here\n")
    tok = FakeTokenizer()
    stage = BuildCalibLoader(CalibSpec(captions=str(path), max_samples=3, seq_len=8, batch_size=2))
    data = stage.run(Artifacts.of([loaded_with(tok)]))
    assert tok.calls[0]["texts"] == ["a red bus", "two dogs on grass", "the sea"]
    assert tok.calls[0]["add_special_tokens"] is False
    s = data.stats
    # rows: [a red bus | two dogs on grass] (7 tokens), [the sea] (2): one batch of two rows
    assert (s.samples, s.real_tokens, s.total_tokens, s.layout, s.batches) == (3, 9, 14, "packed", 1)
    assert data.captions_per_batch == (3,)
    assert s.captions_path == str(path.resolve())
    assert s.captions_sha256 == hashlib.sha256(b"a red bus\ntwo dogs on grass\nthe sea\n").hexdigest()
    assert data.captions == ("a red bus", "two dogs on grass", "the sea")  # validation leaves these out
    assert captions_sha256(data.captions) == s.captions_sha256


def test_stage_is_wired_as_a_stage_and_runs_the_padded_layout(tmp_path: Path) -> None:
    path = write(tmp_path, "a b\nc d e\n")
    stage = BuildCalibLoader(CalibSpec(captions=str(path), max_samples=2, seq_len=4, layout="padded"))
    assert isinstance(stage, Stage)
    check_wiring([stage], [LoadedModel])
    with pytest.raises(WiringError, match="BuildCalibLoader needs a LoadedModel"):
        check_wiring([stage], [])
    data = stage.run(Artifacts.of([loaded_with(FakeTokenizer())]))
    assert data.stats.layout == "padded"
    assert rows(data.batches[0], "attention_mask") == [[1, 1, 0, 0], [1, 1, 1, 0]]


def test_stage_checks_numbers_before_reading_the_file(tmp_path: Path) -> None:
    def build_and_run() -> None:
        stage = BuildCalibLoader(CalibSpec(captions=str(tmp_path / "missing.txt"), seq_len=0))
        stage.run(Artifacts.of([loaded_with(FakeTokenizer())]))

    with pytest.raises(ConfigError, match=r"(calib|CalibSpec)\.seq_len"):
        build_and_run()


# --------------------------------------------------------------------------- memory


GIB = 2**30
BUDGET = MemoryBudget(host_bytes=24 * GIB, device_bytes=24 * GIB, hidden_size=2560, layers=36)


def test_padded_memory_estimate() -> None:
    need = padded_memory(512, CalibSpec(seq_len=512, batch_size=8, layout="padded"), BUDGET)
    assert need.batches == 512 * 512 * 4 * 8  # samples x positions x 4 int64 columns
    assert need.mask == 8 * 512 * 512
    assert need.activations == 8 * 512 * 2560 * 36 * 2 + need.mask
    check_padded_memory(512, 40, CalibSpec(seq_len=512, batch_size=8, layout="padded"), BUDGET)


def test_an_absurd_padded_seq_len_is_refused_with_an_estimate_and_the_fix() -> None:
    spec = CalibSpec(seq_len=10**7, batch_size=8, max_samples=8, layout="padded")
    with pytest.raises(ConfigError) as err:
        check_padded_memory(8, 37, spec, BUDGET)
    message = str(err.value)
    assert message.startswith('calib.seq_len: 10000000 with calib.layout = "padded" needs about 2.38 GiB')
    assert "8 captions x 10000000 positions x 4 columns x 8 bytes" in message
    assert "and 4.47 GiB more while they are built" in message
    assert "roughly 741 TiB of activations per batch of 8" in message
    assert "hidden states of 36 layers x 2560 in 2-byte elements plus a 728 TiB attention mask" in message
    assert "more than the model device's 24 GiB" in message
    assert "set calib.seq_len = 37" in message
    assert 'calib.layout = "packed"' in message
    assert "\n" not in message
    # the packed layout never pads a caption to seq_len: nothing to refuse
    check_padded_memory(8, 37, attrs.evolve(spec, layout="packed"), BUDGET)


def test_the_host_side_alone_can_refuse() -> None:
    spec = CalibSpec(seq_len=4096, batch_size=1, max_samples=100_000, layout="padded")
    small = MemoryBudget(host_bytes=8 * GIB, device_bytes=10**15)
    with pytest.raises(ConfigError, match=r"more than this machine's 8 GiB of memory; the longest caption"):
        check_padded_memory(100_000, 30, spec, small)


def test_stage_refuses_an_absurd_padded_seq_len_before_building_rows(tmp_path: Path) -> None:
    path = write(tmp_path, "a b\nc d e\n")
    stage = BuildCalibLoader(CalibSpec(captions=str(path), max_samples=2, seq_len=10**12, layout="padded"))
    with pytest.raises(ConfigError, match=r"calib\.seq_len: 1000000000000 .* set calib\.seq_len = 3"):
        stage.run(Artifacts.of([loaded_with(FakeTokenizer())]))


# --------------------------------------------------------------------------------------------
# Held-out batches


def test_scorable_truncates_and_drops_one_token_captions() -> None:
    tokenizer = FakeTokenizer(first_id=1, forbid_special_tokens=True)
    ids = scorable(encode(tokenizer, ["a b c d", "x", "e f"]), max_len=3)
    assert ids == [[1, 2, 3], [6, 7]]


def test_holdout_batches_one_caption_per_row_with_padding_out_of_the_loss() -> None:
    import torch

    from auto_quantize_model.backend.lm_forward import as_tensors, target_index

    lists = [[5, 6, 7], [8, 9], [1, 2, 3, 4], [3, 3]]
    batches = [as_tensors(b) for b in holdout_columns(lists, pad_id=0, rows=3)]
    assert [b["input_ids"].shape for b in batches] == [torch.Size([3, 3]), torch.Size([1, 4])]
    first = batches[0]
    assert first["input_ids"].tolist() == [[8, 9, 0], [3, 3, 0], [5, 6, 7]]
    assert first["labels"].tolist() == [[8, 9, -100], [3, 3, -100], [5, 6, 7]]
    assert first["position_ids"].tolist() == [[0, 1, 2]] * 3
    targets = torch.cat([target_index(b)[1] for b in batches])
    assert targets.numel() == sum(len(x) - 1 for x in lists)
    assert sorted(targets.tolist()) == sorted(t for x in lists for t in x[1:])
