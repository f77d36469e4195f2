"""Bit packing round trips and the exact AutoGPTQ layout."""

import pytest
import torch

from zephyr_plugins.packing import pack_cols, pack_rows, unpack_cols, unpack_rows


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows", [32, 64, 96, 320, 576, 37])
def test_rows_round_trip(bits, rows):
    g = torch.Generator().manual_seed(bits * 1000 + rows)
    q = torch.randint(0, 1 << bits, (rows, 24), generator=g, dtype=torch.int32)
    packed = pack_rows(q, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (-(-rows * bits // 32), 24)
    assert torch.equal(unpack_rows(packed, bits, rows), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cols_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    z = torch.randint(0, 1 << bits, (5, 256), generator=g, dtype=torch.int32)
    packed = pack_cols(z, bits)
    assert packed.shape == (5, 256 * bits // 32)
    assert torch.equal(unpack_cols(packed, bits, 256), z)


def test_four_bit_layout_matches_autogptq():
    # Word w of column n holds rows 8w..8w+7, row j of the word at bit 4j.
    q = torch.arange(16, dtype=torch.int32).view(16, 1) % 16
    packed = pack_rows(q, 4)
    expected0 = sum(j << (4 * j) for j in range(8))
    expected1 = sum((8 + j) << (4 * j) for j in range(8))
    as_unsigned = packed.to(torch.int64) & 0xFFFFFFFF
    assert as_unsigned[:, 0].tolist() == [expected0, expected1]
    assert packed[1, 0] < 0  # top nibble 15 sets the sign bit: stored as a negative int32


def test_three_bit_straddles_words():
    # 32 three-bit values fill exactly three words; value 10 straddles words 0 and 1.
    q = torch.zeros(32, 1, dtype=torch.int32)
    q[10, 0] = 0b111
    packed = pack_rows(q, 3).to(torch.int64) & 0xFFFFFFFF
    assert packed[:, 0].tolist() == [0b11 << 30, 0b1, 0]


def test_pack_rejects_out_of_range_and_bad_bits():
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        pack_rows(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="bits=5"):
        pack_rows(torch.zeros(8, 1, dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="need"):
        unpack_rows(torch.zeros(3, 1, dtype=torch.int32), 4, 32)
