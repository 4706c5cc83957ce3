"""Token alignment between a source and a target prompt, for Prompt-to-Prompt edits.

A word swap changes some words of the prompt; the other words keep their places. The
replacement mapper M tells, for every target token j, which source tokens i its
cross-attention map is taken from: M[i, j] is the weight of source token i in target token j.

A refinement adds or removes words. A global alignment of the two token sequences gives, for
every target token j, the source token mapper[j] it aligns with, and alpha[j] = 0 where the
target token has none (an added word keeps its own attention).

    python seq_aligner.py "A lion eating" "A hippopotamus eating"
    python seq_aligner.py --refine "a cat riding a bicycle" "a fluffy cat riding a bicycle"
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

import cli

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MAX_NUM_WORDS = 77  # CLIP's context length: every cross-attention map has 77 columns.
# The global alignment's scores, as in the paper's code.
MATCH_SCORE, MISMATCH_SCORE, GAP_SCORE = 1, -1, 0


def _word_token_spans(text: str, tokenizer: PreTrainedTokenizerBase) -> list[range]:
    """Token positions of each space-separated word, counting the BOS token at position 0.

    CLIP's BPE never merges across a space, so tokenising the words one by one gives exactly the
    tokens of the whole text.
    """
    spans, start = [], 1
    for word in text.split(" "):
        num_tokens = len(tokenizer.encode(word, add_special_tokens=False))
        spans.append(range(start, start + num_tokens))
        start += num_tokens
    return spans


def get_word_inds(text: str, word_place: int | str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token positions of a word in `text` (BOS counted, so the first word starts at 1).

    `word_place` is the index of a space-separated word, or a word given as a string, in which
    case every occurrence counts; punctuation attached to a word ("bicycle.") is not part of it.
    """
    spans = _word_token_spans(text, tokenizer)
    if isinstance(word_place, int):
        return list(spans[word_place])
    word = word_place.lower()
    num_word_tokens = len(tokenizer.encode(word, add_special_tokens=False))
    return [
        position
        for text_word, span in zip(text.split(" "), spans)
        if text_word.lower().strip(string.punctuation) == word or text_word.lower() == word
        for position in span[:num_word_tokens]
    ]


def get_replacement_mapper_(
    x: str, y: str, tokenizer: PreTrainedTokenizerBase, max_len: int = MAX_NUM_WORDS
) -> torch.Tensor:
    """The (max_len, max_len) mapper from source prompt `x` to target prompt `y` (a word swap).

    Words that differ are replaced: a word of n source tokens and m target tokens fills its n x m
    block with the identity when n == m and with 1/max(n, m) everywhere otherwise. Every other
    token, padding included, maps one to one, shifted by what earlier replacements added.
    """
    words_x, words_y = x.split(" "), y.split(" ")
    if len(words_x) != len(words_y):
        raise ValueError(
            f"A word swap needs prompts with the same number of words, but the source has "
            f"{len(words_x)} and the target {len(words_y)}: {x!r} -> {y!r}. Change whole words only, "
            f"and write a multi-word replacement as one word joined by '-' or as several swaps."
        )
    spans_x, spans_y = _word_token_spans(x, tokenizer), _word_token_spans(y, tokenizer)
    mapper = torch.zeros(max_len, max_len)
    i = j = 0  # next source and target token to map
    for word_x, word_y, span_x, span_y in zip(words_x, words_y, spans_x, spans_y):
        if word_x == word_y:
            continue
        while i < span_x.start:  # the unchanged tokens before this replacement
            mapper[i, j] = 1
            i, j = i + 1, j + 1
        rows, cols = torch.tensor(span_x), torch.tensor(span_y)
        if len(span_x) == len(span_y):
            mapper[rows, cols] = 1
        else:
            mapper[rows[:, None], cols[None, :]] = 1 / max(len(span_x), len(span_y))
        i, j = span_x.stop, span_y.stop
    while i < max_len and j < max_len:  # the rest of the prompt and the padding
        mapper[i, j] = 1
        i, j = i + 1, j + 1
    return mapper


def get_replacement_mapper(
    prompts: list[str], tokenizer: PreTrainedTokenizerBase, max_len: int = MAX_NUM_WORDS
) -> torch.Tensor:
    """Mappers from the first prompt to each later one, stacked to (len(prompts) - 1, max_len, max_len)."""
    return torch.stack(
        [get_replacement_mapper_(prompts[0], target, tokenizer, max_len) for target in prompts[1:]]
    )


def align_tokens(source: list[int], target: list[int]) -> list[int]:
    """Global alignment (Needleman-Wunsch) of two token sequences: match +1, mismatch -1, gap 0.

    Returns, for every target token, the position of the source token it aligns with, or -1 where
    it aligns with none (an added token). Ties are broken as in the paper's code.
    """
    n, m = len(source), len(target)
    score = [[(i + j) * GAP_SCORE if i == 0 or j == 0 else 0 for j in range(m + 1)] for i in range(n + 1)]
    move = [["add" if i == 0 else "drop" if j == 0 else "" for j in range(m + 1)] for i in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            add = score[i][j - 1] + GAP_SCORE  # target token j - 1 has no source token
            drop = score[i - 1][j] + GAP_SCORE  # source token i - 1 has no target token
            pair = score[i - 1][j - 1] + (MATCH_SCORE if source[i - 1] == target[j - 1] else MISMATCH_SCORE)
            score[i][j] = max(add, drop, pair)
            move[i][j] = "add" if score[i][j] == add else "drop" if score[i][j] == drop else "pair"
    aligned = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:  # trace the best alignment back from its end
        if move[i][j] == "pair":
            i, j = i - 1, j - 1
            aligned[j] = i
        elif move[i][j] == "add":
            j -= 1
        else:
            i -= 1
    return aligned


def get_refinement_mapper_(
    x: str, y: str, tokenizer: PreTrainedTokenizerBase, max_len: int = MAX_NUM_WORDS
) -> tuple[torch.Tensor, torch.Tensor]:
    """The refinement mapper from source prompt `x` to target prompt `y` (words added or removed).

    Returns (mapper, alphas), both of shape (max_len,): target token j takes the map of source
    token mapper[j] where alphas[j] is 1; an added token (alphas[j] = 0, mapper[j] = 0 unused)
    keeps its own. Padding after the target's end token follows the source's padding, never a word.
    """
    source = tokenizer.encode(x, truncation=True, max_length=max_len)
    target = tokenizer.encode(y, truncation=True, max_length=max_len)
    aligned = torch.tensor(align_tokens(source, target))
    mapper = torch.zeros(max_len, dtype=torch.int64)
    mapper[: len(target)] = aligned.clamp(min=0)
    padding = torch.arange(max_len - len(target))
    mapper[len(target) :] = (len(source) + padding).clamp(max=max_len - 1)
    alphas = torch.ones(max_len)
    alphas[: len(target)] = aligned.ge(0).float()
    return mapper, alphas


def get_refinement_mapper(
    prompts: list[str], tokenizer: PreTrainedTokenizerBase, max_len: int = MAX_NUM_WORDS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refinement mappers and alphas from the first prompt to each later one, stacked to
    (len(prompts) - 1, max_len): an int64 mapper of source positions and float alphas."""
    mappers, alphas = zip(*(get_refinement_mapper_(prompts[0], y, tokenizer, max_len) for y in prompts[1:]))
    return torch.stack(mappers), torch.stack(alphas)


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(
        description="Print the token mapping of a Prompt-to-Prompt word swap (or of a refinement)."
    )
    parser.add_argument("source", nargs="?", default="A lion eating", help="source prompt")
    parser.add_argument("target", nargs="?", default="A hippopotamus eating", help="target prompt")
    parser.add_argument(
        "--refine", action="store_true", help="align the tokens globally (words added or removed)"
    )
    args = parser.parse_args(argv)
    num_words = len(args.source.split(" ")), len(args.target.split(" "))
    if not args.refine and num_words[0] != num_words[1]:
        cli.usage_error(
            f"a word swap keeps the number of words, but the source has {num_words[0]} and the target "
            f"{num_words[1]}: add --refine to align prompts that add or remove words"
        )

    from offline_models import offline_clip_tokenizer
    from ptp_utils import check_prompt_length

    tokenizer = offline_clip_tokenizer()
    for name, prompt in (("source", args.source), ("target", args.target)):
        check_prompt_length(tokenizer, prompt, name)
    source_tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode(args.source))
    target_tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode(args.target))
    if args.refine:
        mapper, alphas = get_refinement_mapper_(args.source, args.target, tokenizer)
        for j, target_token in enumerate(target_tokens):
            source = f"{source_tokens[mapper[j]]} ({mapper[j]})" if alphas[j] else "added: keeps its own map"
            print(f"{j:2d} {target_token:>16} <- {source}")
        return
    mapper = get_replacement_mapper_(args.source, args.target, tokenizer)
    for j, target_token in enumerate(target_tokens):
        sources = [
            f"{source_tokens[i]}:{mapper[i, j]:.2f}" for i in mapper[:, j].nonzero().flatten().tolist()
        ]
        print(f"{j:2d} {target_token:>16} <- {', '.join(sources)}")


if __name__ == "__main__":
    main()
