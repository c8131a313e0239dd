"""Concepts applied at run time, one set of concepts per sample of a batch (branches).

Concept Conductor keeps concepts apart by running each one in its own model; serving several
users' concepts at once needs the same. The reference code deep-copies the UNet and merges
one adapter per copy; here one UNet call serves K branches: every adapted ``nn.Linear`` gets
a forward hook that adds each branch's update to that branch's samples only::

    out[b] = (W0 + ΔW_k) x[b] + bias           for every sample b with branch_of[b] == k

By default (``merge=True``) each branch's weights W0 + ΔW_k are formed once on entry (memory: one
copy of every adapted linear per branch that adapts it, freed on exit) and each linear runs one
matmul per branch present in the call, on that branch's rows: the matmul work of a merged model.
In merge mode an adapted linear whose input is the UNet call's text conditioning (cross-attention
``to_k``/``to_v``, or a view of a layer-wise conditioning) computes its output once per
conditioning tensor and reuses it while that tensor is passed unchanged (same object, same
version, same branch assignment): the keys and values of the text do not change from step to step.
With ``merge=False`` nothing is copied: the linear runs W0 x on every row and adds ΔW_k x[b] on
each branch's rows (one extra matmul per branch, on that branch's rows). Either way the base
weights are never rewritten. A branch with no concepts is the base model. Inside
``branched_concepts(pipeline, branches, branch_of)`` every channel of ``ConceptEffects``
applies per sample:

* ``deltas``: ``scale * ΣΔW`` of the branch's concepts, as above.
* ``weights`` (a fused model): ΔW = W_fused − W0 for that branch, unscaled; like
  ``merge.apply_concepts``, full weights at a path replace the deltas at that path.
* ``token_deltas``: ``scale * ΔW`` added only at the rows (text-token positions) whose token
  is one of ``TokenDelta.tokens``. The linear's input must be (batch, tokens, in) with the
  tokens of the prompt as rows: cross-attention ``to_k``/``to_v`` in the UNet, or any linear
  of the text encoder.
* ``text_residuals``: ``vector`` added to the text encoder's last hidden state at the
  positions of ``token`` (pooled output and ``hidden_states`` are left alone). A concept whose
  ``meta["prompt_word"]`` is set (Cones 2: its class word) has no tokens: inside the block its
  ``<name>`` expands to that word (``tokens.set_prompt_words``, restored on exit); two such
  concepts of one word in one branch are refused.
* ``embeddings``: token rows are global (concepts' tokens have distinct names), so all
  branches' rows are written into the table once with ``tokens.write_embeddings``.

On exit every hook is removed and rows of tokens that already existed are written back, so
the pipeline computes exactly what it did before. Tokens the concepts added stay in the
tokenizer and table (as after ``apply_concepts``): prompts without them encode as before.

**Which sample is which branch.** ``branch_of`` (set at entry or with
``handle.set_branches``) has one branch index per sample, S entries. A UNet call of batch
B = c·S tiles it (classifier-free guidance's ``cat([uncond, cond])``: sample b's branch is
``branch_of[b % S]``, so the unconditional half runs through the same branch's model, as in a
merged model). A text-encoder call of M = c·S rows repeats each entry c times in place
(``encode_layerwise`` encodes prompt-major, S prompts x L layer variants); the unconditional
prompts are encoded in their own call of S rows, as the samplers do. Calls of other batch
sizes raise ``ConceptflowError``. With one branch (``runtime_concepts``) any batch works.

**Where the concept's tokens are.** Text-encoder linears and residuals read the ids of the
call itself (a pre-hook on the input embedding). A UNet call only sees hidden states, so for
UNet token deltas the handle finds each sample's ids in one of two ways:

* explicitly: ``handle.set_token_ids(ids)``, ids (B, T) or (B, L, T) for the B rows of the
  UNet call exactly as the UNet sees them (e.g. ``cat([uncond_ids, cond_ids])``);
* automatically (default): every text-encoder call inside the context is recorded (its
  output and ids, the last 16 calls); each UNet row's conditioning (each of the L layer
  slices of a layer-wise (B, L, T, D) tensor) is looked up by exact equality among the
  recorded outputs. This survives ``encode_layerwise``'s view/expand and the CFG concat but
  not a cast or any edit of the hidden states between the encoder and the UNet; an
  unmatched row raises ``ConceptflowError`` (then use ``set_token_ids``).

A layer-wise prompt has the concept's tokens at the same positions in every layer variant;
a token delta applies at the positions where any of its tokens stands in any of the sample's
layer variants (so ``tokens`` may list one layer's token strings or all of them).
A token string is a word the tokenizer turns into exactly one token (``dog``, an added
``<dog1_l00>``) or a vocabulary entry (``dog</w>``); multi-token words are refused.

Not supported: modules other than ``nn.Linear``; linears called with a batch other than the
model call's (the UNet expands its timestep to the batch, so the time embedding is fine); a
text encoder called through its submodules instead of ``text_encoder(ids)`` (residuals need
the top-level call), or with ``inputs_embeds`` instead of ids while it has adapted linears or
residuals (rows are assigned to branches by the ids' batch).
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from conceptflow.adapters.concept_io import get_linear
from conceptflow.adapters.tokens import prompt_words, set_prompt_words, write_embeddings
from conceptflow.errors import ConceptflowError

if TYPE_CHECKING:
    from conceptflow.adapters.effects import ConceptEffects

MODELS = ("unet", "text_encoder")
RECORDED_ENCODES = 16  # text-encoder outputs kept (references, not copies) to find UNet rows' token ids
REUSED_CONTEXTS = 4  # per adapted linear: outputs kept for inputs that are the UNet's text conditioning


def _root(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage ``tensor`` views (itself when it is no view)."""
    return tensor if tensor._base is None else tensor._base


@dataclass
class _LinearPlan:
    """What the branches add to one linear: dense ΔW per branch, token ΔW per branch."""

    path: str
    module: nn.Linear
    dense: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    merged: dict[int, torch.Tensor] = field(default_factory=dict)  # branch -> W0 + ΔW (merge mode)
    token: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (branch, ΔW, token ids)
    reused: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # context view -> (context, output)

    @property
    def model(self) -> str:
        return self.path.partition(".")[0]


@dataclass
class _Call:
    """The model call under way: each row's branch, rows per branch, token ids (rows, L, T)."""

    batch: int
    groups: dict[int, torch.Tensor | None]  # branch -> row indices (None: every row)
    runs: tuple[tuple[int, int, int], ...] | None = None  # (branch, first row, end row) when rows come in few runs
    ids: torch.Tensor | None = None
    context: torch.Tensor | None = None  # the UNet call's encoder_hidden_states (storage root)
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # id(token ids) -> mask, for this call

    def token_mask(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(rows, T) True where one of ``token_ids`` stands (in any layer variant)."""
        if self.ids is None:
            raise ConceptflowError("a token-position update ran but the token ids of this call are unknown")
        key = id(token_ids)
        if key not in self.masks:
            self.masks[key] = torch.isin(self.ids, token_ids.to(self.ids.device)).any(dim=1)
        return self.masks[key]


def _token_id(vocab: dict[str, int], tokenizer, token: str) -> int:
    """The id a prompt gets for ``token``: a word's own token first ("dog" -> "dog</w>", not
    the word-piece "dog"), else the vocabulary entry of that name ("dog</w>")."""
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) == 1:
        return ids[0]
    if token in vocab:
        return vocab[token]
    raise ConceptflowError(
        f"token {token!r} is not one token of the tokenizer (it splits into {len(ids)}); name a vocabulary entry"
    )


def _pooled_embeddings(branches) -> dict[str, torch.Tensor]:
    embeddings: dict[str, torch.Tensor] = {}
    for concepts in branches:
        for concept in concepts:
            for token, row in concept.embeddings.items():
                if token in embeddings and not torch.equal(embeddings[token], row):
                    raise ConceptflowError(
                        f"two concepts define token {token!r} with different embeddings; rename one concept"
                    )
                embeddings[token] = row
    return embeddings


def _word_concepts(branches) -> dict[str, str]:
    """{concept: word} of the concepts written in prompts as a word (``meta["prompt_word"]``;
    Cones 2: ``<name>`` becomes the class word its residual is at). Two such concepts of one word
    in one branch are refused: their residuals would add at the same positions."""
    words: dict[str, str] = {}
    for concepts in branches:
        by_word: dict[str, str] = {}
        for concept in concepts:
            word = concept.meta.get("prompt_word")
            if not word:
                continue
            if word in by_word and by_word[word] != concept.name:
                raise ConceptflowError(
                    f"concepts {by_word[word]!r} and {concept.name!r} are both written as the word {word!r} "
                    "(text residuals at their class word) in one prompt or combination: their residuals would add "
                    "at the same positions; put them in different combinations, or retrain one with another class word")
            by_word[word] = concept.name
            words[concept.name] = word
    return words


class BranchedConcepts:
    """The handle of an active ``branched_concepts`` block (see the module docstring)."""

    def __init__(self, pipeline, branches: Sequence[Sequence["ConceptEffects"]], scale: float, merge: bool = True):
        if not branches:
            raise ConceptflowError("branched_concepts needs at least one branch (an empty branch is the base model)")
        self.pipeline = pipeline
        self.n_branches = len(branches)
        self._branches = [[piece for concept in concepts for piece in concept.with_parts()] for concepts in branches]
        self._scale = float(scale)
        self._merge = merge
        self._forwards: list[nn.Linear] = []  # linears whose forward is replaced (merge mode), restored on exit
        self._branch_of: torch.Tensor | None = None
        self._assignment = 0  # counts set_branches calls (outputs reused for one assignment only)
        self._explicit_ids: torch.Tensor | None = None
        self._calls: dict[str, _Call | None] = {model: None for model in MODELS}
        self._records: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=RECORDED_ENCODES)
        self._generation = 0
        self._match_cache: tuple | None = None
        self._group_cache: dict[tuple, tuple[dict[int, torch.Tensor | None], tuple | None]] = {}
        self._handles: list = []
        self._restore_rows: dict[int, torch.Tensor] = {}
        self._restore_words: dict[str, str] | None = None
        self._plans: dict[str, _LinearPlan] = {}
        self._residuals: list[tuple[int, int, torch.Tensor]] = []  # (branch, token id, vector)
        self._needs_unet_ids = False  # some UNet linear has a token-position update

    # ------------------------------------------------------------------ public
    def set_branches(self, branch_of: Sequence[int]) -> None:
        """One branch index per sample (S entries); see the module docstring for batch rules."""
        indices = torch.as_tensor(list(branch_of), dtype=torch.long)
        if indices.ndim != 1 or indices.numel() == 0:
            raise ConceptflowError("branch_of must list one branch index per sample")
        if int(indices.min()) < 0 or int(indices.max()) >= self.n_branches:
            raise ConceptflowError(f"branch_of {indices.tolist()} names a branch outside 0..{self.n_branches - 1}")
        self._branch_of = indices
        self._assignment += 1
        self._group_cache.clear()

    def set_token_ids(self, input_ids: torch.Tensor | None) -> None:
        """Token ids (B, T) or (B, L, T) of the rows of the next UNet calls; None: find them automatically."""
        if input_ids is not None and input_ids.ndim not in (2, 3):
            raise ConceptflowError(f"token ids must be (B, T) or (B, L, T), got shape {tuple(input_ids.shape)}")
        self._explicit_ids = None if input_ids is None else input_ids.long()

    # ------------------------------------------------------------------ setup
    def _open(self) -> None:
        pipeline = self.pipeline
        tokenizer, text_encoder = pipeline.tokenizer, pipeline.text_encoder
        embeddings = _pooled_embeddings(self._branches)
        vocab = tokenizer.get_vocab()
        table = text_encoder.get_input_embeddings().weight
        self._restore_rows = {vocab[t]: table[vocab[t]].detach().clone() for t in embeddings if t in vocab}
        write_embeddings(tokenizer, text_encoder, embeddings)
        vocab = tokenizer.get_vocab()
        self._compile(vocab)
        words = _word_concepts(self._branches)
        if words:
            self._restore_words = set_prompt_words(tokenizer, {**prompt_words(tokenizer), **words})
        self._install()

    def _linear(self, path: str) -> nn.Linear:
        if path.partition(".")[0] not in MODELS:
            raise ConceptflowError(f"adapted path {path!r} must start with 'unet.' or 'text_encoder.'")
        try:
            module = get_linear(self.pipeline, path)
        except AttributeError as error:
            raise ConceptflowError(f"adapted path {path!r} is not a module of this pipeline") from error
        if not isinstance(module, nn.Linear):
            raise ConceptflowError(f"{path} is a {type(module).__name__}; run-time branches adapt nn.Linear only")
        return module

    def _plan(self, path: str) -> _LinearPlan:
        if path not in self._plans:
            self._plans[path] = _LinearPlan(path, self._linear(path))
        return self._plans[path]

    def _cast(self, plan: _LinearPlan, delta: torch.Tensor, what: str) -> torch.Tensor:
        weight = plan.module.weight
        if tuple(delta.shape) != tuple(weight.shape):
            raise ConceptflowError(f"{what} of {plan.path} has shape {tuple(delta.shape)}, the layer {tuple(weight.shape)}")
        return delta.detach().to(device=weight.device, dtype=weight.dtype)

    def _compile(self, vocab: dict[str, int]) -> None:
        tokenizer = self.pipeline.tokenizer
        for branch, concepts in enumerate(self._branches):
            summed: dict[str, torch.Tensor] = {}
            for concept in concepts:
                for path, delta in concept.deltas.items():
                    summed[path] = summed.get(path, 0) + self._scale * delta.float()
            for concept in concepts:
                for path, fused in getattr(concept, "weights", {}).items():
                    base = self._linear(path).weight.detach().float()
                    summed[path] = fused.float().to(base.device) - base
            for path, delta in summed.items():
                plan = self._plan(path)
                plan.dense.append((branch, self._cast(plan, delta, "ΔW")))
            for concept in concepts:
                for path, token_delta in getattr(concept, "token_deltas", {}).items():
                    plan = self._plan(path)
                    ids = torch.tensor(sorted({_token_id(vocab, tokenizer, t) for t in token_delta.tokens}),
                                       dtype=torch.long, device=plan.module.weight.device)
                    plan.token.append((branch, self._cast(plan, self._scale * token_delta.delta.float(), "token ΔW"), ids))
                for residual in getattr(concept, "text_residuals", []):
                    width = self.pipeline.text_encoder.config.hidden_size
                    if tuple(residual.vector.shape) != (width,):
                        raise ConceptflowError(f"text residual at {residual.token!r} has shape "
                                               f"{tuple(residual.vector.shape)}, the text encoder's output ({width},)")
                    self._residuals.append((branch, _token_id(vocab, tokenizer, residual.token), residual.vector.detach()))

    def _install(self) -> None:
        pipeline = self.pipeline
        self._needs_unet_ids = any(plan.token for plan in self._plans.values() if plan.model == "unet")
        for plan in self._plans.values():
            if self._merge and plan.dense:
                weight = plan.module.weight.detach()
                plan.merged = {branch: weight + delta for branch, delta in plan.dense}
                plan.module.forward = self._merged_forward(plan)
                self._forwards.append(plan.module)
            self._handles.append(plan.module.register_forward_hook(self._linear_hook(plan)))
        self._handles.append(pipeline.unet.register_forward_pre_hook(self._unet_pre, with_kwargs=True))
        self._handles.append(pipeline.unet.register_forward_hook(self._unet_post))
        embedding = pipeline.text_encoder.get_input_embeddings()
        self._handles.append(embedding.register_forward_pre_hook(self._text_pre))
        self._handles.append(pipeline.text_encoder.register_forward_hook(self._text_post))

    def _close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._forwards:
            del module.forward  # the class's forward again
        self._forwards.clear()
        for plan in self._plans.values():
            plan.merged = {}
            plan.reused.clear()
        self._records.clear()
        self._match_cache = None
        self._calls = {model: None for model in MODELS}
        if self._restore_words is not None:
            set_prompt_words(self.pipeline.tokenizer, self._restore_words)
            self._restore_words = None
        if self._restore_rows:
            table = self.pipeline.text_encoder.get_input_embeddings().weight
            with torch.no_grad():
                for token_id, row in self._restore_rows.items():
                    table[token_id] = row

    # ------------------------------------------------------------------ rows
    def _groups(self, model: str, batch: int, device: torch.device) -> tuple[dict[int, torch.Tensor | None], tuple | None]:
        """Rows of a ``model`` call of ``batch`` rows per branch (None: all rows) and, when the
        rows come in no more runs of one branch than there are repeats of ``branch_of`` (samples
        sorted by branch: one run per classifier-free-guidance half), the runs ``(branch, start,
        end)`` in row order; cached until set_branches."""
        key = (model, batch, device)
        if key in self._group_cache:
            return self._group_cache[key]
        if self.n_branches == 1:
            groups: dict[int, torch.Tensor | None] = {0: None}
            runs = None
        else:
            if self._branch_of is None:
                raise ConceptflowError("several branches are active: call set_branches(branch_of) before the model runs")
            samples = len(self._branch_of)
            if batch % samples:
                raise ConceptflowError(
                    f"{model} was called with batch {batch}, not a multiple of the {samples} samples in branch_of"
                )
            repeats = batch // samples
            rows = self._branch_of.repeat(repeats) if model == "unet" else self._branch_of.repeat_interleave(repeats)
            groups = {}
            for branch in rows.unique().tolist():
                index = (rows == branch).nonzero().flatten()
                groups[branch] = None if len(index) == batch else index.to(device)
            starts = [0] + [r for r in range(1, batch) if rows[r] != rows[r - 1]]
            runs = tuple((int(rows[a]), a, b) for a, b in zip(starts, starts[1:] + [batch]))
            if len(groups) == 1 or len(runs) > repeats * len(groups):
                runs = None
        self._group_cache[key] = (groups, runs)
        return groups, runs

    # ------------------------------------------------------------------ hooks
    def _call_of(self, plan: _LinearPlan, x: torch.Tensor) -> _Call:
        call = self._calls[plan.model]
        if call is None:
            raise ConceptflowError(f"{plan.path} ran outside a {plan.model} call; branches cannot tell its samples")
        if x.shape[0] != call.batch:
            raise ConceptflowError(f"{plan.path} got batch {x.shape[0]} inside a {plan.model} call of batch {call.batch}")
        return call

    def _merged_forward(self, plan: _LinearPlan):
        """The linear's forward in merge mode: each branch's rows through that branch's weights."""
        module = plan.module

        def forward(x: torch.Tensor) -> torch.Tensor:
            call = self._call_of(plan, x)
            context = call.context
            if context is None or _root(x) is not context:
                return project(call, x)
            # x is (a view of) the UNet call's text conditioning, which stays the same tensor from step to
            # step: cross-attention keys/values are computed once per conditioning and reused
            key = (x.data_ptr(), tuple(x.shape), x.stride(), x._version, x.dtype, self._assignment, call.batch)
            hit = plan.reused.get(key)
            if hit is not None and hit[0] is context:
                return hit[1]
            output = project(call, x)
            if not output.requires_grad:
                if len(plan.reused) >= REUSED_CONTEXTS:
                    plan.reused.pop(next(iter(plan.reused)))
                plan.reused[key] = (context, output)
            return output

        def project(call: _Call, x: torch.Tensor) -> torch.Tensor:
            bias = module.bias
            if len(call.groups) == 1:
                (branch,) = call.groups
                return F.linear(x, plan.merged.get(branch, module.weight), bias)
            if call.runs is None:
                output = x.new_empty(*x.shape[:-1], module.out_features)
                for branch, index in call.groups.items():
                    output[index] = F.linear(x[index], plan.merged.get(branch, module.weight), bias)
                return output
            if torch.is_grad_enabled() or not x.is_contiguous():  # out= has no autograd
                return torch.cat([F.linear(x[a:b], plan.merged.get(branch, module.weight), bias)
                                  for branch, a, b in call.runs])
            # contiguous runs of rows: each branch's matmul writes its slice of the output in place
            rows = x.reshape(-1, x.shape[-1])
            per_sample = rows.shape[0] // x.shape[0]
            output = x.new_empty(*x.shape[:-1], module.out_features)
            out_rows = output.view(-1, module.out_features)
            for branch, a, b in call.runs:
                weight = plan.merged.get(branch, module.weight).t()
                piece, target = rows[a * per_sample:b * per_sample], out_rows[a * per_sample:b * per_sample]
                if bias is None:
                    torch.mm(piece, weight, out=target)
                else:
                    torch.addmm(bias, piece, weight, out=target)
            return output

        return forward

    def _linear_hook(self, plan: _LinearPlan):
        def hook(module, inputs, output):
            x = inputs[0]
            call = self._call_of(plan, x)
            for branch, delta in plan.dense if not plan.merged else ():
                if branch not in call.groups:
                    continue
                index = call.groups[branch]
                if index is None:
                    output = output + F.linear(x, delta)
                else:
                    output = output.index_add(0, index, F.linear(x[index], delta))
            for branch, delta, token_ids in plan.token:
                if branch not in call.groups:
                    continue
                mask = call.token_mask(token_ids)
                if x.ndim != 3 or x.shape[1] != mask.shape[1]:
                    raise ConceptflowError(
                        f"{plan.path} has a token-position update but its input {tuple(x.shape)} is not "
                        f"(batch, {mask.shape[1]} text tokens, in)"
                    )
                index = call.groups[branch]
                rows = x if index is None else x[index]
                rows_mask = mask if index is None else mask[index]
                update = F.linear(rows, delta) * rows_mask.unsqueeze(-1).to(output.dtype)
                output = output + update if index is None else output.index_add(0, index, update)
            return output

        return hook

    def _unet_pre(self, module, args, kwargs):
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        call = _Call(sample.shape[0], *self._groups("unet", sample.shape[0], sample.device))
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if context is not None:
            call.context = _root(context)
        if self._needs_unet_ids:
            call.ids = self._unet_ids(context, sample.shape[0]).to(sample.device)
        self._calls["unet"] = call

    def _unet_post(self, module, inputs, output):
        self._calls["unet"] = None

    def _text_pre(self, module, inputs):
        input_ids = inputs[0]
        groups, runs = self._groups("text_encoder", input_ids.shape[0], input_ids.device)
        self._calls["text_encoder"] = _Call(input_ids.shape[0], groups, runs, input_ids.unsqueeze(1))

    def _text_post(self, module, inputs, output):
        call = self._calls["text_encoder"]
        self._calls["text_encoder"] = None
        if call is None:
            if self._residuals or self._needs_unet_ids:
                raise ConceptflowError("the text encoder ran without input ids; token channels need them")
            return output
        hidden = output[0]
        if self._residuals:
            ids = call.ids[:, 0]
            added = torch.zeros_like(hidden)
            for branch, token_id, vector in self._residuals:
                if branch not in call.groups:
                    continue
                at_token = (ids == token_id).unsqueeze(-1).to(hidden.dtype) * vector.to(hidden.device, hidden.dtype)
                index = call.groups[branch]
                added = added + at_token if index is None else added.index_add(0, index, at_token[index])
            hidden = hidden + added
            if isinstance(output, tuple):
                output = (hidden,) + tuple(output[1:])
            else:
                output["last_hidden_state"] = hidden
        if self._needs_unet_ids:
            self._records.append((hidden.detach(), call.ids[:, 0]))
            self._generation += 1
        return output

    # ------------------------------------------------------------------ token ids of UNet rows
    def _unet_ids(self, context: torch.Tensor | None, batch: int) -> torch.Tensor:
        if self._explicit_ids is not None:
            ids = self._explicit_ids
            if ids.shape[0] != batch:
                raise ConceptflowError(f"set_token_ids gave {ids.shape[0]} rows for a UNet call of batch {batch}")
            return ids if ids.ndim == 3 else ids.unsqueeze(1)
        if context is None:
            raise ConceptflowError("UNet token-position updates need encoder_hidden_states (or set_token_ids)")
        cache = self._match_cache
        if cache is not None and cache[0] is context and cache[1] == context._version and cache[2] == self._generation:
            return cache[3]
        ids = self._match(context)
        self._match_cache = (context, context._version, self._generation, ids)
        return ids

    def _match(self, context: torch.Tensor) -> torch.Tensor:
        """Ids (B, L, T) of each row of ``context`` (B, T, D) or (B, L, T, D), found among recorded encodes."""
        batch, tokens = context.shape[0], context.shape[-2]
        rows = context.detach().reshape(-1, tokens, context.shape[-1])
        records = [(h, i) for h, i in self._records if h.shape[1:] == rows.shape[1:]]
        if records:
            hidden = torch.cat([h for h, _ in records]).to(rows.device, rows.dtype)
            record_ids = torch.cat([i for _, i in records])
            candidates = (rows[:, None, -1] == hidden[None, :, -1]).all(dim=-1)  # last position: sees the whole prompt
        found = []
        for row_index in range(rows.shape[0]):
            match = None
            if records:
                for m in candidates[row_index].nonzero().flatten().tolist():
                    if torch.equal(rows[row_index], hidden[m]):
                        match = record_ids[m]
                        break
            if match is None:
                raise ConceptflowError(
                    f"UNet row {row_index // (rows.shape[0] // batch)}'s conditioning is not the output of a text-encoder "
                    "call made inside branched_concepts (encoded before entering, cast or edited?); give its token ids "
                    "with handle.set_token_ids"
                )
            found.append(match)
        return torch.stack(found).view(batch, -1, tokens)


@contextlib.contextmanager
def branched_concepts(pipeline, branches: Sequence[Sequence["ConceptEffects"]],
                      branch_of: Sequence[int] | None = None, scale: float = 1.0,
                      merge: bool = True) -> Iterator[BranchedConcepts]:
    """Apply ``branches[branch_of[b]]`` to sample b of every UNet/text-encoder call in the block.

    ``scale`` multiplies every ΔW (``deltas``, ``token_deltas``), as ``apply_concepts`` does;
    full ``weights`` and text residuals apply as given. ``branch_of`` may be set later with
    ``handle.set_branches`` (needed before a model call when there are several branches).
    ``merge``: form each branch's adapted weights once (a merged model's matmul work, a copy of the
    adapted linears per branch) or add ΔW x on the branch's rows (no copy, an extra matmul).
    """
    handle = BranchedConcepts(pipeline, branches, scale, merge)
    if branch_of is not None:
        handle.set_branches(branch_of)
    try:
        handle._open()
        yield handle
    finally:
        handle._close()


@contextlib.contextmanager
def runtime_concepts(pipeline, concepts: Sequence["ConceptEffects"], scale: float = 1.0) -> Iterator[BranchedConcepts]:
    """Every channel of ``concepts`` (run-time ones included) applied to every sample: one branch."""
    with branched_concepts(pipeline, [concepts], scale=scale) as handle:
        yield handle
