import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lowbit.core.pack import pack, packed_words, unpack


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 3, 31, 32, 33, 95, 128, 129])
def test_round_trip_every_width(bits, n):
    rng = np.random.default_rng(bits * 1000 + n)
    codes = rng.integers(0, 2**bits, size=(5, n))
    words = pack(codes, bits)
    assert words.dtype == np.uint32 and words.shape == (5, packed_words(n, bits))
    np.testing.assert_array_equal(np.asarray(unpack(words, bits, n)), codes)


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(1, 8), shape=st.tuples(st.integers(1, 4), st.integers(1, 70)), seed=st.integers(0, 2**31))
def test_round_trip_property(bits, shape, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=shape)
    np.testing.assert_array_equal(np.asarray(unpack(pack(codes, bits), bits, shape[1])), codes)


def _bitstream_reference(codes, bits):
    """Independent definition: code j occupies stream bits [j*bits, (j+1)*bits), LSB first."""
    stream = []
    for c in codes:
        stream += [(int(c) >> i) & 1 for i in range(bits)]
    stream += [0] * ((-len(stream)) % 32)
    return np.array([sum(b << i for i, b in enumerate(stream[w:w + 32])) for w in range(0, len(stream), 32)],
                    dtype=np.uint32)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_layout_is_the_documented_bitstream(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=70)
    np.testing.assert_array_equal(np.asarray(pack(codes, bits)), _bitstream_reference(codes, bits))


def test_nibble_order():
    assert int(pack(np.arange(8), 4)[0]) == 0x76543210


def test_three_bit_codes_span_words():
    codes = np.zeros(32, int)
    codes[10] = 0b111  # bits 30..32: two bits in word 0, one in word 1
    w = np.asarray(pack(codes, 3))
    assert w[0] == 0b11 << 30 and w[1] == 1 and w[2] == 0


def test_errors():
    with pytest.raises(ValueError, match="bits"):
        pack(np.zeros(4), 9)
    with pytest.raises(ValueError, match="bits"):
        pack(np.zeros(4), 0)
    with pytest.raises(ValueError, match="uint32"):
        unpack(np.zeros(4, np.int32), 4, 32)
    with pytest.raises(ValueError, match="expected 2"):
        unpack(np.zeros(3, np.uint32), 4, 16)
