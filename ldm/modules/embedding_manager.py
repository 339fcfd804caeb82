"""The learned pseudo-words of Textual Inversion: trainable vectors spliced into a text encoder's token embeddings.

The conditioner (`FrozenCLIPEmbedder` for SD v1, `BERTEmbedder` for LDM) calls `forward(ids, embeds)` right after
its token-embedding lookup and before the position embeddings, so a placeholder such as "*" is read by the text
transformer as the learned vectors instead of the placeholder's own token embedding.

Deliberate departures from the original code (rinongal/textual_inversion):
- An initializer word's vector is its raw token-embedding row on both backends. The original's CLIP path also
  added the position-0 embedding, which the encoder then adds again at the placeholder's real position.
- A placeholder without an initializer word starts from N(mean, std) of the token-embedding table, per dimension,
  so it begins at the scale of real words; the original drew U[0, 1).
- Progressive words follow the training step the trainer sets (`set_training_step`), not a count of forward calls
  that validation and image logging also advanced and that no file recorded.
- `load` takes the vector count from the file (a multi-vector file works with a one-vector config) and re-derives
  token ids from this tokenizer; the dimension is checked against this encoder.
- Per-image tokens are added to a copy of the placeholder list; the caller's config list is left alone.
"""
import functools
import os
import re
import shlex
import warnings

import torch
from torch import nn

from ldm.data.templates import per_img_token_list
from ldm.embeddings import Embeddings, load_embeddings, replace_learned_words, save_embeddings
from ldm.modules.encoders.tokenizers import (one_token_problem, ordinary_token_id, text_token_ids, token_pieces,
                                             tokenizer_family)
from ldm.text_encoders import model_family

PROGRESSIVE_STEPS_PER_VECTOR = 2000
# A prompt's 77 token slots (CLIP's and LDM-BERT's) less its start and end tokens; the caption's own words take more.
MAX_VECTORS_PER_TOKEN = 75
SETTINGS_KEY = "model.params.personalization_config.params."
PLACEHOLDER_CANDIDATES = ("*", "@", "&", "$", "§", "~")
# Rare one-token symbols (in CLIP's BPE and LDM-BERT's vocabulary) that stand in for a file's word that is several
# tokens, such as diffusers' "<cat-toy>": prompts are rewritten to the stand-in before tokenizing.
STAND_IN_CANDIDATES = ("¢", "¥", "¿", "¡", "½", "²", "ø", "«", "»")
ESCAPED_KEY_PREFIX = "utf8hex_"
_PARAMETER_DICT_ATTRIBUTES = frozenset(dir(nn.ParameterDict()))


def parameter_key(placeholder: str) -> str:
    """The `nn.ParameterDict` key for a placeholder.

    It is the placeholder itself, as in the original checkpoints (`string_to_param_dict.*`), unless torch refuses
    that name (empty, containing ".", or an attribute nn.Module already has); then it is an injective hex escape.
    Strings that look like an escape are escaped too, so two placeholders never share a key.
    """
    usable = (
        placeholder
        and "." not in placeholder
        and not placeholder.startswith(ESCAPED_KEY_PREFIX)
        and placeholder not in _PARAMETER_DICT_ATTRIBUTES
    )
    return placeholder if usable else ESCAPED_KEY_PREFIX + placeholder.encode("utf-8").hex()


@functools.lru_cache(maxsize=64)
def _device_tensor(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """`values` on `device`, made once: building it at every step would copy from the host, which waits for the
    GPU to finish its queued work. Read only."""
    return torch.tensor(values, device=device)


def _initializer_token_id(tokenizer, word: str) -> int:
    """The one token id of initializer word `word`, or a ValueError that shows its split and its pieces that would
    work."""
    problem = one_token_problem(tokenizer, word)
    if problem is None:
        return ordinary_token_id(tokenizer, word)
    pieces = dict.fromkeys(piece.removeprefix("##") for piece in token_pieces(tokenizer, word))
    usable = [p for p in pieces if p and p != word and ordinary_token_id(tokenizer, p) is not None]
    shorter = "a shorter common word that describes the concept"
    hint = f"use one of its single-token pieces ({', '.join(usable)}) or {shorter}" if usable else f"use {shorter}"
    raise ValueError(f"initializer word '{word}' {problem}: {hint}")


def token_table_statistics(embedder) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the token table per dimension, the scale of real words (a pass over the whole table: take it
    once for all the placeholders of a manager)."""
    table = embedder.token_embedding.weight.detach().float()
    return table.mean(dim=0), table.std(dim=0)


def initial_vectors(embedder, word: str | None, count: int, generator: torch.Generator | None = None,
                    statistics: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The (count, D) float32 vectors a placeholder starts training from, on the token table's device: its
    initializer `word`'s raw token-embedding row repeated, or without a word N(mean, std) of the token table per
    dimension (`statistics`, else computed here), so that it begins at the scale of real words; the noise is drawn
    on the CPU from `generator` (None: torch's global one), so a seed gives the same noise on every device.
    scripts/evaluate_toy.py builds its baselines here too, so that they stay what training starts from."""
    table = embedder.token_embedding.weight.detach()
    if word:
        return table[_initializer_token_id(embedder.tokenizer, word)].float().expand(count, -1).clone()
    mean, std = statistics if statistics is not None else token_table_statistics(embedder)
    noise = torch.randn(count, table.shape[1], generator=generator, device="cpu").to(table.device)
    return noise * std + mean


def word_list(words) -> list:
    """A config's list of words; one plain string is one word (list("dog") would train its letters)."""
    return [words] if isinstance(words, str) else list(words or ())


def checked_vector_settings(num_vectors_per_token, max_vector_norm) -> tuple[int, float | None]:
    """The vector count and norm cap as numbers, or a one-line ValueError naming the config key: int() would cut
    2.7 to 2, and vectors past a prompt's slots are cut from every caption, so they would never train.
    main.py calls it before any model is built."""
    count = num_vectors_per_token
    if isinstance(count, float) and count.is_integer():
        count = int(count)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_VECTORS_PER_TOKEN:
        raise ValueError(f"{SETTINGS_KEY}num_vectors_per_token {num_vectors_per_token!r} is not a whole number from 1 "
                         f"to {MAX_VECTORS_PER_TOKEN} (a prompt's 77 token slots less its start and end tokens, and "
                         "fewer with the caption's words): set e.g. 1 or 4")
    norm = max_vector_norm
    if norm is not None and (isinstance(norm, bool) or not isinstance(norm, (int, float)) or not norm > 0):
        raise ValueError(f"{SETTINGS_KEY}max_vector_norm {norm!r} is not a positive number: set a length such as 0.5, "
                         "or null for no cap")
    return count, None if norm is None else float(norm)


class EmbeddingManager(nn.Module):
    """Holds one (k, D) fp32 Parameter per placeholder string and substitutes it wherever the placeholder occurs.

    With k > 1 each occurrence expands to the active number of vectors, pushing the rest of the prompt to the right
    and truncating to the prompt length, as the original did. From the conditioner it uses `tokenizer`,
    `token_dim` and `token_embedding` (the table that supplies initial vectors).
    """

    def __init__(
        self,
        embedder,
        placeholder_strings=("*",),
        initializer_words=(),
        per_image_tokens=False,
        num_vectors_per_token=1,
        progressive_words=False,
        embedding_manager_ckpt="",
        max_vector_norm=None,
        **kwargs,
    ):
        super().__init__()
        if kwargs:
            warnings.warn(f"EmbeddingManager ignores unknown arguments {sorted(kwargs)}", stacklevel=2)
        placeholders = word_list(placeholder_strings)
        initializer_words = word_list(initializer_words)
        if not placeholders and not per_image_tokens:
            raise ValueError("EmbeddingManager needs at least one placeholder string, e.g. placeholder_strings: ['*']")
        if len(initializer_words) > len(placeholders):
            raise ValueError(
                f"{len(initializer_words)} initializer_words for {len(placeholders)} placeholder_strings; "
                "give at most one initializer word per placeholder"
            )
        num_vectors_per_token, max_vector_norm = checked_vector_settings(num_vectors_per_token, max_vector_norm)

        self.tokenizer = embedder.tokenizer
        self.token_dim = int(embedder.token_dim)
        # Recorded in saved files: it names the stock tokenizer that merging and converting them use (tiny models too).
        self.model_family = model_family(self.token_dim, tokenizer_family(self.tokenizer), width_decides=False)
        self.num_vectors_per_token = num_vectors_per_token
        self.progressive_words = bool(progressive_words)
        self.max_vector_norm = max_vector_norm
        self.training_step = 0
        self.string_to_token_dict: dict[str, int] = {}  # placeholder -> the token id that it is read as
        self.stand_ins: dict[str, str] = {}  # a file's word of several tokens -> the one-token symbol read in its place
        self.initializer_words: dict[str, str] = {}
        self.string_to_param_dict = nn.ParameterDict()
        self.initial_embeddings = nn.ParameterDict()

        if per_image_tokens:
            placeholders = placeholders + self._per_image_tokens()
        statistics = None
        for index, placeholder in enumerate(placeholders):
            token = self._placeholder_token_id(placeholder, taken=self.string_to_token_dict)
            self._claim_token(placeholder, token, self.string_to_token_dict)
            word = initializer_words[index] if index < len(initializer_words) else None
            if not word and statistics is None:
                statistics = token_table_statistics(embedder)
            vectors = initial_vectors(embedder, word, self.num_vectors_per_token, statistics=statistics)
            if word:
                self.initial_embeddings[parameter_key(placeholder)] = nn.Parameter(vectors.clone(), requires_grad=False)
                self.initializer_words[placeholder] = word
            self.string_to_param_dict[parameter_key(placeholder)] = nn.Parameter(vectors)
        self.to(embedder.token_embedding.weight.device)

        if embedding_manager_ckpt:
            self.load(embedding_manager_ckpt)

    def _per_image_tokens(self) -> list[str]:
        """The 22 Hebrew letters of the dataset's per-image captions, checked up front for a clearer error."""
        unusable = [letter for letter in per_img_token_list if not self._is_single_token(letter)]
        if unusable:
            raise ValueError(
                f"per_image_tokens needs each of the {len(per_img_token_list)} letters {''.join(per_img_token_list)} "
                f"to be one token, but this tokenizer splits {len(unusable)} of them (e.g. '{unusable[0]}'); "
                "set per_image_tokens: false or use the LDM (BERT) conditioner"
            )
        return list(per_img_token_list)

    def _is_single_token(self, text: str) -> bool:
        return ordinary_token_id(self.tokenizer, text) is not None

    def _placeholder_token_id(self, placeholder: str, path: str | None = None, taken=()) -> int:
        """The one token id of `placeholder`, or a ValueError that shows the split and names symbols that would work
        (other than the placeholders `taken`); for a placeholder read from embedding file `path`, the command that
        renames it there."""
        problem = one_token_problem(self.tokenizer, placeholder)
        if problem is None:
            return ordinary_token_id(self.tokenizer, placeholder)
        taken = set(taken) | {placeholder}
        usable = [c for c in PLACEHOLDER_CANDIDATES if c not in taken and self._is_single_token(c)]
        hint = f"try one of {' '.join(usable)}" if usable else "try a single symbol or a short rare word"
        if path is not None and usable:
            path = os.fspath(path)
            converted = shlex.quote(os.path.splitext(path)[0] + "-converted.pt")
            hint = (f"convert the file and write {usable[0]} in prompts: python scripts/convert_embedding.py "
                    f"--input {shlex.quote(path)} --output {converted} --format original "
                    f"--token {shlex.quote(usable[0])}")
        raise ValueError(f"placeholder '{placeholder}' {problem}: {hint}")

    def _stand_ins(self, words: list[str], tokens: dict[str, int], source: str) -> dict[str, str]:
        """A one-token symbol for each of `words` (several tokens each, as diffusers' "<cat-toy>" or an A1111 file
        named "my-cat"), none of them a token of the placeholders in `tokens`, to which each is claimed."""
        stand_ins = {}
        free = (c for c in STAND_IN_CANDIDATES if self._is_single_token(c)
                and ordinary_token_id(self.tokenizer, c) not in tokens.values())
        for word in words:
            stand_in = next(free, None)
            if stand_in is None:
                raise ValueError(f"{source}: placeholder '{word}' is several tokens, and this tokenizer has no symbol "
                                 "left to read it as; rename it to one token: scripts/convert_embedding.py --token '*'")
            self._claim_token(word, ordinary_token_id(self.tokenizer, stand_in), tokens)
            stand_ins[word] = stand_in
        return stand_ins

    @staticmethod
    def _claim_token(placeholder: str, token: int, claimed: dict[str, int]):
        """Add `placeholder` to `claimed` ({placeholder: token id}) unless another placeholder has its token."""
        for other, other_token in claimed.items():
            if other_token == token:
                raise ValueError(
                    f"placeholders '{other}' and '{placeholder}' are the same token (id {token}) for this tokenizer; "
                    "give each placeholder a distinct string"
                )
        claimed[placeholder] = token

    def vectors(self, placeholder: str) -> nn.Parameter:
        """The learned (k, D) vectors of one placeholder."""
        return self.string_to_param_dict[parameter_key(placeholder)]

    def set_training_step(self, step: int):
        """Called by the trainer each step; progressive words unlock one more vector every 2000 steps."""
        if step < 0:
            raise ValueError(f"training step must be non-negative, got {step}")
        self.training_step = int(step)

    def num_active_vectors(self, num_vectors: int) -> int:
        if not self.progressive_words:
            return num_vectors
        return min(num_vectors, 1 + self.training_step // PROGRESSIVE_STEPS_PER_VECTOR)

    def prompt_for_tokenizer(self, text: str) -> str:
        """`text` as the tokenizer must see it: each word of several tokens replaced by its stand-in symbol, and a
        space on each side of every placeholder made only of punctuation.

        CLIP's tokenizer reads a run of punctuation as one token, so in "a photo of *, red" the placeholder would be
        the token "*," and go unreplaced. Letters and digits are split from punctuation anyway, so word placeholders
        ("sks") are left alone, and the spaces change nothing else: the tokenizer collapses whitespace. A word of
        several tokens matches regardless of case (both tokenizers lowercase) and, where it begins or ends with a
        letter or digit, only as a whole word ("cat-toy" is not found in "bobcat-toys")."""
        text = replace_learned_words(text, self.stand_ins)
        symbols = [p for p in self.string_to_token_dict if p not in self.stand_ins and not any(c.isalnum() for c in p)]
        symbols = sorted([*symbols, *self.stand_ins.values()], key=len, reverse=True)
        if not symbols:
            return text
        return re.sub("|".join(map(re.escape, symbols)), lambda match: f" {match.group(0)} ", text)

    def cuts_learned_vectors(self, caption: str, length: int) -> bool:
        """Whether the text encoder, reading `length` token slots (start and end tokens included), would miss a
        learned vector of `caption`, each learned word given all its vectors: the tokenizer drops a word past the
        slots, and a vector that the words before it push past them is cut off."""
        widths = {token: self.vectors(word).shape[0] for word, token in self.string_to_token_dict.items()}
        end = 1  # the slot after the last one filled; the start token has the first
        ids = text_token_ids(self.tokenizer, self.prompt_for_tokenizer(caption))
        for position, token in enumerate(ids, start=1):
            end += widths.get(token, 1)
            if token in widths and (position > length - 2 or end > length):
                return True
        return False

    def forward(self, tokenized_text: torch.Tensor, embedded_text: torch.Tensor) -> torch.Tensor:
        """(B, n) ids and (B, n, D) raw token embeddings -> new (B, n, D) embeddings with the placeholders replaced.

        All placeholders expand at once: input position j takes w_j output slots (m active vectors for a placeholder,
        one otherwise), and output slot o is filled from the input position whose slot range covers o. This equals the
        original's right-to-left insertion with truncation to n, without a Python loop over occurrences. The input
        tensor is never written to, so autograd through the caller's embeddings stays valid.
        """
        batch, length, dim = embedded_text.shape
        device = tokenized_text.device
        placeholder_index = torch.full_like(tokenized_text, -1)
        active_vectors, widths_per_placeholder = [], []
        for index, (placeholder, token) in enumerate(self.string_to_token_dict.items()):
            placeholder_index = torch.where(tokenized_text == token, index, placeholder_index)
            vectors = self.vectors(placeholder)
            active = self.num_active_vectors(vectors.shape[0])
            active_vectors.append(vectors[:active])
            widths_per_placeholder.append(active)

        widths_per_placeholder = _device_tensor(tuple(widths_per_placeholder), device)
        is_placeholder = placeholder_index >= 0
        widths = torch.where(is_placeholder, widths_per_placeholder[placeholder_index.clamp_min(0)], 1)
        slot_ends = widths.cumsum(dim=1)
        slots = torch.arange(length, device=device).expand(batch, length).contiguous()
        source = torch.searchsorted(slot_ends, slots, right=True)
        offset = slots - (slot_ends - widths).gather(1, source)
        source_placeholder = placeholder_index.gather(1, source)

        learned_rows = torch.cat(active_vectors).to(embedded_text.dtype)
        first_row = widths_per_placeholder.cumsum(0) - widths_per_placeholder
        learned = learned_rows[first_row[source_placeholder.clamp_min(0)] + offset]
        kept = embedded_text.gather(1, source.unsqueeze(-1).expand(-1, -1, dim))
        return torch.where((source_placeholder >= 0).unsqueeze(-1), learned, kept)

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The only parameters the optimizer trains in the usual frozen-model mode."""
        return list(self.string_to_param_dict.values())

    def embedding_to_coarse_loss(self) -> torch.Tensor:
        """Pull toward the initializer words: mean entry of the Gram matrix d·dᵀ of d = vectors - initial,
        averaged over the placeholders that have an initializer word (for k = 1, the squared L2 distance)."""
        losses = []
        for placeholder in self.initializer_words:
            difference = self.vectors(placeholder) - self.initial_embeddings[parameter_key(placeholder)]
            losses.append((difference @ difference.T).mean())
        if not losses:
            return torch.zeros((), device=self.embedding_parameters()[0].device)
        return torch.stack(losses).mean()

    def vector_norms(self) -> dict[str, torch.Tensor]:
        """L2 norm of each learned vector, (k,) per placeholder, for logging."""
        return {placeholder: self.vectors(placeholder).detach().norm(dim=1) for placeholder in self.string_to_token_dict}

    def nonfinite_placeholders(self) -> list[str]:
        """The placeholders whose vectors hold NaN or infinite values (a diverged run's), in one read from the
        device."""
        placeholders = list(self.string_to_token_dict)
        if not placeholders:
            return []
        finite = torch.stack([torch.isfinite(self.vectors(p)).all() for p in placeholders]).tolist()
        return [placeholder for placeholder, ok in zip(placeholders, finite) if not ok]

    @torch.no_grad()
    def apply_norm_cap(self):
        """Rescale vectors longer than `max_vector_norm` onto that norm; the trainer calls it after each step."""
        if self.max_vector_norm is None:
            return
        for vectors in self.embedding_parameters():
            norms = vectors.norm(dim=1, keepdim=True).clamp_min(torch.finfo(vectors.dtype).tiny)
            vectors.mul_((self.max_vector_norm / norms).clamp(max=1.0))

    def save(self, path: str, step: int | None = None, extra_metadata: dict | None = None):
        """Write the vectors in the original `.pt` layout, plus what is needed to use them safely later."""
        placeholders = list(self.string_to_token_dict)
        metadata = {
            "model_family": self.model_family,
            "num_vectors_per_token": max(self.vectors(p).shape[0] for p in placeholders),
            "dim": self.token_dim,
            "step": step,
            "placeholder_strings": placeholders,
            "initializer_words": [self.initializer_words.get(p) for p in placeholders],
        }
        metadata.update(extra_metadata or {})
        embeddings = Embeddings(
            vectors={p: self.vectors(p).detach().float().cpu() for p in placeholders},
            token_ids={p: t for p, t in self.string_to_token_dict.items() if p not in self.stand_ins},  # ids of words
            metadata=metadata,
        )
        save_embeddings(embeddings, path, format="original")

    def load(self, path: str):
        """Replace all placeholders and vectors with those of an embedding file (see `set_embeddings`)."""
        self.set_embeddings(load_embeddings(path), source=f"embedding file '{path}'", path=path)

    def _tokens_for(self, embeddings: Embeddings, source: str, path: str | None):
        """The token id of each placeholder of `embeddings` (in the file's order), and the stand-in tokens of those
        the tokenizer splits into several; a ValueError naming `source` for a clash or an unusable word."""
        convertible = path if len(embeddings.vectors) == 1 else None  # convert_embedding.py renames one placeholder
        tokens = {}
        several = [p for p in embeddings.vectors if len(text_token_ids(self.tokenizer, p)) > 1]
        folded = {}
        for word in several:  # prompts name these words regardless of case
            other = folded.setdefault(word.casefold(), word)
            if other != word:
                raise ValueError(f"{source}: placeholders '{other}' and '{word}' differ only in case, which prompts "
                                 "do not tell apart; rename one with scripts/convert_embedding.py --token")
        for placeholder in embeddings.vectors:
            if placeholder in several:
                continue
            try:
                token = self._placeholder_token_id(placeholder, convertible, taken=tokens)
                self._claim_token(placeholder, token, tokens)
            except ValueError as error:
                raise ValueError(f"{source}: {error}") from None
        stand_ins = self._stand_ins(several, tokens, source)
        return {placeholder: tokens[placeholder] for placeholder in embeddings.vectors}, stand_ins

    def set_embeddings(self, embeddings: Embeddings, source: str = "the embeddings", path: str | None = None):
        """Replace all placeholders and vectors with those of `embeddings`, e.g. several files merged in memory.

        Token ids come from this tokenizer (recorded ids are only compared), the vector count from the embeddings,
        and the training step from their metadata when recorded, so a progressive-words config uses exactly the
        vectors that were active when the file was written (all of them when no step is recorded: diffusers files,
        merged files). `source` names them in errors; `path`, the one file they
        come from, lets an error say how to convert it. Optimizers built before this call hold stale tensors.
        """
        if not embeddings.vectors:
            raise ValueError(f"{source} holds no vectors")
        embeddings.check_width(self.token_dim, source)
        # Checked in full before anything is replaced, so a refused file leaves the manager as it was.
        tokens, stand_ins = self._tokens_for(embeddings, source, path)
        previous_initial = {p: self.initial_embeddings[parameter_key(p)] for p in self.initializer_words}
        previous_words = self.initializer_words
        device = self.embedding_parameters()[0].device
        self.string_to_token_dict, self.stand_ins, self.initializer_words = tokens, stand_ins, {}
        self.string_to_param_dict, self.initial_embeddings = nn.ParameterDict(), nn.ParameterDict()
        for placeholder, vectors in embeddings.vectors.items():
            token = tokens[placeholder]
            recorded = embeddings.token_ids.get(placeholder)
            if recorded is not None and int(recorded) != token and placeholder not in stand_ins:
                warnings.warn(
                    f"{source} records token id {int(recorded)} for '{placeholder}' but this tokenizer "
                    f"gives {token}; the file may come from another tokenizer",
                    stacklevel=2,
                )
            vectors = vectors.detach().float().clone().to(device)
            self.string_to_param_dict[parameter_key(placeholder)] = nn.Parameter(vectors)
            if placeholder in previous_initial:
                initial = previous_initial[placeholder][:1].expand(vectors.shape[0], -1).clone()
                self.initial_embeddings[parameter_key(placeholder)] = nn.Parameter(initial, requires_grad=False)
                self.initializer_words[placeholder] = previous_words[placeholder]
        self.num_vectors_per_token = max(v.shape[0] for v in embeddings.vectors.values())
        step = embeddings.metadata.get("step")
        if isinstance(step, int):
            self.training_step = step
        else:
            self.training_step = (self.num_vectors_per_token - 1) * PROGRESSIVE_STEPS_PER_VECTOR
