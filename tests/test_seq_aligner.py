"""Token alignment with the real CLIP tokenizer: word swaps and refinements, expected values by hand."""

import pytest
import torch

from seq_aligner import (
    MAX_NUM_WORDS,
    align_tokens,
    get_refinement_mapper,
    get_refinement_mapper_,
    get_replacement_mapper,
    get_replacement_mapper_,
    get_word_inds,
    main,
)


def shifted_identity(pairs_from: int, shift: int) -> torch.Tensor:
    """M[i, i + shift] = 1 for every i >= pairs_from that stays inside the 77 x 77 matrix."""
    mapper = torch.zeros(MAX_NUM_WORDS, MAX_NUM_WORDS)
    for i in range(pairs_from, MAX_NUM_WORDS):
        if 0 <= i + shift < MAX_NUM_WORDS:
            mapper[i, i + shift] = 1
    return mapper


def test_word_inds_count_bos_and_cover_multi_token_words(tokenizer):
    # CLIP: "a" "hippo" "potam" "us" "eating" -> positions 1, 2-4, 5 after BOS.
    assert get_word_inds("A hippopotamus eating", 1, tokenizer) == [2, 3, 4]
    assert get_word_inds("A hippopotamus eating", "hippopotamus", tokenizer) == [2, 3, 4]
    assert get_word_inds("A hippopotamus eating", "eating", tokenizer) == [5]
    assert get_word_inds("A lion eating", 0, tokenizer) == [1]


def test_word_inds_every_occurrence_and_trailing_punctuation(tokenizer):
    assert get_word_inds("a cat and a cat.", "cat", tokenizer) == [2, 5]
    assert get_word_inds("photo of a cat riding on a bicycle.", "bicycle", tokenizer) == [8]
    assert get_word_inds("a dog", "cat", tokenizer) == []


@pytest.mark.parametrize(
    "text",
    ["photo of a cat riding on a bicycle.", "An unimaginably large house", "a <my-thing> toy, isn't it?"],
)
def test_words_tokenised_alone_give_the_tokens_of_the_text(tokenizer, text):
    ids = tokenizer.encode(text)
    positions = [p for i in range(len(text.split(" "))) for p in get_word_inds(text, i, tokenizer)]
    assert positions == list(range(1, len(ids) - 1))


def test_one_token_swap_is_the_identity(tokenizer):
    mapper = get_replacement_mapper_("A haunted house", "A magical house", tokenizer)
    assert mapper.shape == (MAX_NUM_WORDS, MAX_NUM_WORDS)
    assert mapper.dtype == torch.float32
    torch.testing.assert_close(mapper, torch.eye(MAX_NUM_WORDS))


def test_one_to_three_tokens(tokenizer):
    # source: BOS a lion eating EOS...; target: BOS a hippo potam us eating EOS...
    expected = shifted_identity(3, shift=2)
    expected[0, 0] = expected[1, 1] = 1
    expected[2, 2:5] = 1 / 3
    mapper = get_replacement_mapper_("A lion eating", "A hippopotamus eating", tokenizer)
    torch.testing.assert_close(mapper, expected)


def test_three_tokens_to_one(tokenizer):
    expected = shifted_identity(5, shift=-2)
    expected[0, 0] = expected[1, 1] = 1
    expected[2:5, 2] = 1 / 3
    mapper = get_replacement_mapper_("A hippopotamus eating", "A lion eating", tokenizer)
    torch.testing.assert_close(mapper, expected)


def test_n_to_m_tokens(tokenizer):
    # "unimaginably" is uni|magin|ably (3 tokens), "inconceivably" in|conce|iv|ably (4 tokens).
    expected = shifted_identity(5, shift=1)
    expected[0, 0] = expected[1, 1] = 1
    expected[2:5, 2:6] = 1 / 4
    mapper = get_replacement_mapper_("An unimaginably large house", "An inconceivably large house", tokenizer)
    torch.testing.assert_close(mapper, expected)
    # The words after the swap keep their own tokens: "large" -> "large", "house" -> "house".
    assert mapper[5, 6] == 1 and mapper[6, 7] == 1


def test_two_swaps_follow_the_offset(tokenizer):
    # lion (1 token) -> hippopotamus (3), then eating -> drinking (1 -> 1) two positions further on.
    mapper = get_replacement_mapper_("A lion eating", "A hippopotamus drinking", tokenizer)
    assert mapper[2, 2:5].tolist() == pytest.approx([1 / 3] * 3)
    assert mapper[3, 5] == 1
    assert mapper[4, 6] == 1  # EOS


def test_stacked_mappers(tokenizer):
    prompts = ["A lion eating", "A hippopotamus eating", "A tiger eating"]
    mappers = get_replacement_mapper(prompts, tokenizer)
    assert mappers.shape == (2, MAX_NUM_WORDS, MAX_NUM_WORDS)
    torch.testing.assert_close(mappers[0], get_replacement_mapper_(prompts[0], prompts[1], tokenizer))
    torch.testing.assert_close(mappers[1], torch.eye(MAX_NUM_WORDS))


def test_different_word_counts_name_both_counts(tokenizer):
    with pytest.raises(ValueError, match=r"source has 3 and the target 4"):
        get_replacement_mapper_("A lion eating", "A big lion eating", tokenizer)


# Refinement: a global alignment of the token sequences (match +1, mismatch -1, gap 0).


def test_alignment_pairs_equal_tokens_and_never_mismatches():
    assert align_tokens([1, 2, 3], [1, 2, 3]) == [0, 1, 2]
    # A changed token costs less as a gap on each side (0 + 0) than as a mismatch (-1).
    assert align_tokens([1, 2, 3], [1, 4, 3]) == [0, -1, 2]
    assert align_tokens([1, 3], [1, 2, 2, 3]) == [0, -1, -1, 1]
    # Two equally good alignments: as in the paper's code, the first source occurrence is kept.
    assert align_tokens([1, 2, 2, 3], [1, 2, 3]) == [0, 1, 3]


def test_refinement_added_word(tokenizer):
    # BOS a cat riding a bicycle EOS -> BOS a fluffy cat riding a bicycle EOS
    mapper, alphas = get_refinement_mapper(
        ["a cat riding a bicycle", "a fluffy cat riding a bicycle"], tokenizer
    )
    assert mapper.shape == alphas.shape == (1, MAX_NUM_WORDS)
    assert mapper.dtype == torch.int64 and alphas.dtype == torch.float32
    mapper, alphas = mapper[0], alphas[0]
    assert mapper[[0, 1, 3, 4, 5, 6, 7]].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert alphas.nonzero().flatten().tolist() == [0, 1] + list(range(3, MAX_NUM_WORDS))
    # Padding of the target (from position 8) takes the source's padding (from position 7), in order.
    assert mapper[8:].tolist() == list(range(7, MAX_NUM_WORDS - 1))


def test_refinement_removed_words_never_map_padding_to_a_word(tokenizer):
    # BOS a big fluffy cat EOS (6 tokens) -> BOS a cat EOS (4 tokens): big and fluffy are dropped.
    mapper, alphas = get_refinement_mapper_("a big fluffy cat", "a cat", tokenizer)
    assert mapper[:4].tolist() == [0, 1, 4, 5]
    assert alphas.eq(1).all()
    # Target padding from position 4 on takes source padding from position 6 on (the paper's code
    # maps it to positions 4 and 5: the source's "cat" and end token); the last ones share 76.
    assert mapper[4:].tolist() == list(range(6, MAX_NUM_WORDS)) + [MAX_NUM_WORDS - 1] * 2


def test_refinement_multi_token_words(tokenizer):
    # BOS a lion eating EOS -> BOS a hippo potam us eating EOS: lion is dropped, its three tokens added.
    mapper, alphas = get_refinement_mapper_("A lion eating", "A hippopotamus eating", tokenizer)
    assert alphas[:7].tolist() == [1, 1, 0, 0, 0, 1, 1]
    assert mapper[[0, 1, 5, 6]].tolist() == [0, 1, 3, 4]
    # BOS a house EOS -> BOS an uni magin ably large house EOS: "a" and "an" differ too.
    mapper, alphas = get_refinement_mapper_("a house", "an unimaginably large house", tokenizer)
    assert alphas[:8].tolist() == [1, 0, 0, 0, 0, 0, 1, 1]
    assert mapper[[0, 6, 7]].tolist() == [0, 2, 3]


def test_refinement_several_targets_and_identical_prompts(tokenizer):
    prompts = [
        "a cat riding a bicycle",
        "a cat riding a bicycle",
        "a cat riding",
        "a fluffy cat riding a bicycle",
    ]
    mapper, alphas = get_refinement_mapper(prompts, tokenizer)
    assert mapper.shape == alphas.shape == (3, MAX_NUM_WORDS)
    assert mapper[0].tolist() == list(range(MAX_NUM_WORDS)) and alphas[0].eq(1).all()
    # BOS a cat riding EOS: riding's EOS pairs with the source's EOS (6), padding follows from 7.
    assert mapper[1, :5].tolist() == [0, 1, 2, 3, 6]
    assert mapper[1, 5:8].tolist() == [7, 8, 9] and alphas[1].eq(1).all()
    assert alphas[2, :8].tolist() == [1, 1, 0, 1, 1, 1, 1, 1]


def test_refine_command_line_prints_the_alignment(capsys):
    main(["--refine", "a cat riding a bicycle", "a fluffy cat riding a bicycle"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8
    assert lines[2].split() == ["2", "fluffy</w>", "<-", "added:", "keeps", "its", "own", "map"]
    assert lines[3].split() == ["3", "cat</w>", "<-", "cat</w>", "(2)"]
