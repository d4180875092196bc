"""Exact contrastive losses whose memory is bounded by a chunk of the score matrix.

The dense losses hold the [B, N] logits (B local rows, N = W*B gathered columns) and
autograd keeps a few more of that size: OpenCLIP's ClipLoss needs 16.5 GB at a 32k batch
on one process. Here the score matrix is only ever materialised one [chunk, chunk] block
at a time (as in Inf-CL, arXiv:2410.17243):

- forward: one pass over the chunks accumulates, per row, the running max and sum of
  exp(logit - max) (a log-sum-exp) and the maxima that decide top-1 accuracy; when the
  keys are the queries' own pairs (one process), the same per column gives the other
  direction of the symmetric loss from the same chunks;
- backward (a custom autograd.Function): the chunks are recomputed and
  d loss / d logits = softmax - onehot (sigmoid - onehot for SigLIP) is contracted with
  the features chunk by chunk, so the gradients w.r.t. the queries, the keys and the
  logit scale/bias accumulate without the [B, N] matrix. Gradients w.r.t. gathered keys
  flow back through `all_gather_with_grad` like the dense loss's.

Memory: O(chunk^2) for the live chunks + O((B + N) * D) for the features and their
gradients + O(B + N) for the per-row statistics. Compute, in units of one B*N*D
matmul: on one process 1 forward + 3 backward (OpenCLIP's dense loss: 2 + 4); across
ranks each direction is its own [B, N] matrix, 2 + 6 (dense local loss: 2 + 4).

Class labels (FLYP): with query and key labels, the same-label pairs of each chunk other than
the positives are filled with the dtype's lowest value before the statistics see them: they
add exactly 0 to every softmax sum and gradient, like the dense loss's -inf (a finite value,
so a chunk whose row is entirely masked gives no inf - inf).

Values and gradients equal the dense loss up to floating-point rounding; the statistics
accumulate in float32 (float64 for float64 inputs) while the chunk matmuls run in the
inputs' dtype. Autocast is switched off inside, so forward and the backward's recomputed
chunks use the same precision: pass bfloat16 features for a bfloat16 loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# Side of the square score chunk when a loss is told to chunk but not how much. On the
# 2-core CPU 512..2048 are equally fast on an idle machine (the elementwise passes then
# run from cache); 2048 has 16x fewer chunks than 512, so far fewer parallel regions to
# stall when other processes share the cores. 2048^2 fp32 is 16 MiB per work chunk.
DEFAULT_CHUNK = 2048
# Up to this many logits per rank (local rows x global columns) the dense loss is the
# recommendation: 4096 x 4096 fp32 logits are 64 MiB, and the dense loss keeps ~5 such
# matrices; above it the chunked loss is both faster (on CPU) and bounded in memory.
DENSE_MAX_LOGITS = 4096 * 4096


def recommended_chunk_size(
    local_batch: int, global_batch: int, *, max_dense_logits: int = DENSE_MAX_LOGITS, chunk: int = DEFAULT_CHUNK
) -> int | None:
    """The `chunk_size` a trainer should give ClipLoss/SigLipLoss for this batch.

    None (the dense loss) while local_batch * global_batch <= max_dense_logits, i.e. up
    to a global batch of 4096 on one process or 256 ranks of 256; `chunk` above that.
    The chunked loss gives the same values and gradients, so the switch changes only
    memory and speed (benchmarks/RESULTS.md: on CPU it is also faster from 4k on).
    """
    if local_batch < 1 or global_batch < local_batch:
        raise ValueError(f"need 1 <= local_batch <= global_batch, got {local_batch} and {global_batch}.")
    return None if local_batch * global_batch <= max_dense_logits else chunk


def _ranges(n: int, size: int):
    """[start, stop) of consecutive chunks of `size` covering range(n); the last may be short."""
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the accumulated statistics: float64 stays, anything narrower goes to float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


class _Top1:
    """Top-1 retrieval hits along one dimension of the score matrix, seen chunk by chunk.

    Entry i (a row, or a column) has its positive at position p_i. argmax - the first
    maximum, as torch.argmax breaks ties - is p_i iff x[p_i] >= the max over all
    positions and x[p_i] > the max over positions before p_i. Both maxima come from
    amax: max-with-indices along a chunk's columns costs nearly as much as the chunk's
    matmul on CPU. Only chunks that straddle the positives need a masked amax.
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device):
        self.max = torch.full((n,), float("-inf"), dtype=dtype, device=device)
        self.before = torch.full((n,), float("-inf"), dtype=dtype, device=device)

    def update(self, start: int, stop: int, logits: Tensor, dim: int, diagonal: int, peak: Tensor | None = None) -> Tensor:
        """Fold in a chunk whose positives lie on `diagonal` (chunk entry (r, r + diagonal) is
        row r's positive; column c's is (c - diagonal, c)). Entries start:stop are the
        chunk's rows (dim=1) or columns (dim=0). Returns the chunk's max along dim."""
        peak = logits.amax(dim) if peak is None else peak
        rows, cols = logits.shape
        if dim == 1:  # row r: columns c < r + diagonal come before its positive
            all_before, none_before = diagonal >= cols, diagonal <= -(rows - 1)
            keep = lambda m: m.tril_(diagonal - 1)  # noqa: E731
        else:  # column c: rows r < c - diagonal come before its positive
            all_before, none_before = diagonal <= -rows, diagonal >= cols - 1
            keep = lambda m: m.triu_(diagonal + 1)  # noqa: E731
        if all_before:
            before = peak
        elif not none_before:
            mask = keep(torch.ones(rows, cols, dtype=torch.bool, device=logits.device))
            before = logits.masked_fill(~mask, float("-inf")).amax(dim)
        if not none_before:
            self.before[start:stop] = torch.maximum(self.before[start:stop], before)
        self.max[start:stop] = torch.maximum(self.max[start:stop], peak)
        return peak

    def hits(self, positive: Tensor) -> Tensor:
        """How many entries rank their positive (values `positive`, in entry order) first."""
        return ((positive >= self.max) & (positive > self.before)).sum()


class _RunningSoftmax(_Top1):
    """Top-1 hits plus the running sum of exp(x - max) along one dimension, chunk by chunk.

    The log-sum-exp is kept as the pair (max, sum) and never folded into one number:
    with logits near 100 (CLIP's clamped scale), a float32 log-sum-exp carries an
    absolute rounding error of ~4e-6, which would cost softmax = exp(x - lse) that much
    relative accuracy; exp(x - max) / sum is as accurate as the dense log_softmax.
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device):
        super().__init__(n, dtype, device)
        self.sum = torch.zeros(n, dtype=dtype, device=device)

    def update(self, start: int, stop: int, logits: Tensor, dim: int, diagonal: int, work: Tensor | None = None) -> Tensor:
        """As _Top1.update; `work` is an optional scratch chunk of logits' shape."""
        peak = logits.amax(dim)
        old = self.max[start:stop]
        new = torch.maximum(old, peak)
        chunk_sum = torch.sub(logits, peak.unsqueeze(dim), out=work).exp_().sum(dim)
        self.sum[start:stop] = self.sum[start:stop] * torch.exp(old - new) + chunk_sum * torch.exp(peak - new)
        return super().update(start, stop, logits, dim, diagonal, peak)


class _Scratch:
    """Work chunks reused across the loop: a fresh multi-MB chunk per step costs page faults on CPU.

    scratch(k, rows, cols) is a contiguous [rows, cols] view of buffer k (rows, cols <= the
    sizes given here, so the short last chunks fit too).
    """

    def __init__(self, count: int, rows: int, cols: int, dtype: torch.dtype, device: torch.device):
        self.buffers = [torch.empty(rows * cols, dtype=dtype, device=device) for _ in range(count)]

    def __call__(self, index: int, rows: int, cols: int) -> Tensor:
        return self.buffers[index][: rows * cols].view(rows, cols)


def _scores(q: Tensor, k: Tensor, out: Tensor) -> Tensor:
    """q @ k.T in out's dtype, written into `out` when q already has that dtype."""
    if q.dtype == out.dtype:
        return torch.mm(q, k.T, out=out)
    return (q @ k.T).to(out.dtype)


def _copy_positives(positive: Tensor, logits: Tensor, diagonal: int, row_start: int) -> None:
    """Write the chunk's positives (its `diagonal`) into `positive`, indexed by global row."""
    values = logits.diagonal(diagonal)
    start = row_start + max(0, -diagonal)
    positive[start : start + values.shape[0]] = values


def _accumulate_mm(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out += a @ b, with `a` cast to b's dtype for the matmul and the sum kept in out's dtype."""
    if a.dtype == b.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out.add_(a.to(b.dtype) @ b)


def _frobenius(a: Tensor, b: Tensor, rows: int = 4096) -> Tensor:
    """sum(a * b) for [B, D] tensors, in b's dtype, a block of `rows` at a time.

    The whole [B, D] product was, at a 256k batch, 512 MB: a third of the loss's peak.
    Each block is summed pairwise like `.sum()`, the block sums in float64."""
    total = torch.zeros((), dtype=torch.float64, device=b.device)
    for start, stop in _ranges(a.shape[0], rows):
        total += (a[start:stop].to(b.dtype) * b[start:stop]).sum(dtype=torch.float64)
    return total.to(b.dtype)


def _mask_same_labels(logits: Tensor, query_labels: Tensor | None, key_labels: Tensor | None,
                      i0: int, i1: int, j0: int, j1: int, diagonal: int) -> Tensor:
    """Fill the chunk's same-label pairs (labels >= 0), except its positives on `diagonal`,
    with the lowest finite value of its dtype (in place); no labels: the chunk unchanged."""
    if query_labels is None:
        return logits
    rows = query_labels[i0:i1, None]
    same = (rows == key_labels[None, j0:j1]) & (rows >= 0)
    same.diagonal(diagonal).fill_(False)
    return logits.masked_fill_(same, torch.finfo(logits.dtype).min)


def _check_labels(queries: Tensor, keys: Tensor, query_labels: Tensor | None, key_labels: Tensor | None) -> None:
    if (query_labels is None) != (key_labels is None):
        raise ValueError("give both query_labels and key_labels, or neither.")
    if query_labels is not None and (tuple(query_labels.shape) != (queries.shape[0],) or tuple(key_labels.shape) != (keys.shape[0],)):
        raise ValueError(
            f"labels must be [B] and [N] like the queries and keys, got {tuple(query_labels.shape)} and {tuple(key_labels.shape)}."
        )


def _check_chunked_args(queries: Tensor, keys: Tensor, label_offset: int, chunk: int, columns: bool) -> None:
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries and keys must be [B, D] and [N, D], got {tuple(queries.shape)} and {tuple(keys.shape)}.")
    if not 0 <= label_offset <= keys.shape[0] - queries.shape[0]:
        raise ValueError(
            f"label_offset {label_offset} puts the positives of {queries.shape[0]} queries outside {keys.shape[0]} keys."
        )
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}.")
    if columns and (label_offset != 0 or queries.shape[0] != keys.shape[0]):
        raise ValueError("column statistics need the keys to be the queries' own pairs (same length, offset 0).")


class _ChunkedInfoNCE(torch.autograd.Function):
    """Summed cross-entropy of queries over keys (and optionally of keys over queries), chunked.

    forward(queries [B, D], keys [N, D], logit_scale scalar, label_offset, chunk, columns,
    query_labels [B] | None, key_labels [N] | None)
    -> (row loss sum, column loss sum, row top-1 hits, column top-1 hits).
    logits = logit_scale * queries @ keys.T; query i's positive is key label_offset + i.
    Rows: sum_i CE(logits[i], label_offset + i). Columns (only with columns=True, which
    needs N == B and offset 0): sum_j CE(logits[:, j], j); otherwise 0. With labels, the
    same-label pairs other than the positives are left out (`_mask_same_labels`).
    """

    @staticmethod
    def forward(ctx, queries: Tensor, keys: Tensor, logit_scale: Tensor, label_offset: int, chunk: int, columns: bool,
                query_labels: Tensor | None = None, key_labels: Tensor | None = None):
        with _no_autocast(queries.device):
            stat = _stat_dtype(queries.dtype)
            rows, n, device = queries.shape[0], keys.shape[0], queries.device
            row_stats = _RunningSoftmax(rows, stat, device)
            col_stats = _RunningSoftmax(n if columns else 0, stat, device)
            positive = torch.empty(rows, dtype=stat, device=device)
            scratch = _Scratch(2, min(chunk, rows), min(chunk, n), stat, device)
            for i0, i1 in _ranges(rows, chunk):
                q = queries[i0:i1] * logit_scale.to(queries.dtype)
                for j0, j1 in _ranges(n, chunk):
                    logits = _scores(q, keys[j0:j1], scratch(0, i1 - i0, j1 - j0))
                    diagonal = label_offset + i0 - j0  # the chunk's positives: (r, r + diagonal)
                    _mask_same_labels(logits, query_labels, key_labels, i0, i1, j0, j1, diagonal)
                    # The positives are read off the chunks, not recomputed as row dot
                    # products: with the very logits inside the log-sum-exp, each row's
                    # loss lse - positive is >= 0 and as accurate as the dense loss's.
                    _copy_positives(positive, logits, diagonal, i0)
                    work = scratch(1, i1 - i0, j1 - j0)
                    row_stats.update(i0, i1, logits, 1, diagonal, work)
                    if columns:
                        col_stats.update(j0, j1, logits, 0, diagonal, work)
            # lse - positive = (max - positive) + log(sum): both terms small and accurate.
            row_loss = ((row_stats.max - positive) + row_stats.sum.log()).sum()
            row_hits = row_stats.hits(positive)
            if columns:  # keys are the queries' pairs: column j's positive is row j's
                col_loss = ((col_stats.max - positive) + col_stats.sum.log()).sum()
                col_hits = col_stats.hits(positive)
            else:
                col_loss, col_hits = row_loss.new_zeros(()), row_hits.new_zeros(())
        ctx.save_for_backward(queries, keys, logit_scale, row_stats.max, row_stats.sum, col_stats.max, col_stats.sum)
        ctx.label_offset, ctx.chunk, ctx.columns = label_offset, chunk, columns
        ctx.query_labels, ctx.key_labels = query_labels, key_labels
        ctx.mark_non_differentiable(row_hits, col_hits)
        return row_loss, col_loss, row_hits, col_hits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_row: Tensor, grad_col: Tensor, _grad_row_hits, _grad_col_hits):
        queries, keys, logit_scale, row_max, row_sum, col_max, col_sum = ctx.saved_tensors
        offset, chunk, columns = ctx.label_offset, ctx.chunk, ctx.columns
        with _no_autocast(queries.device):
            stat = row_max.dtype
            grad_row, grad_col = grad_row.to(stat), grad_col.to(stat)
            positive_grad = grad_row + grad_col if columns else grad_row
            # softmax * upstream grad = exp(x - max) * (grad / sum): one row/column factor.
            row_factor, col_factor = grad_row / row_sum, grad_col / col_sum
            # Unscaled sums: g_q = dlogits @ keys, g_k = dlogits.T @ queries; the scale is
            # applied once at the end, and sum(dlogits * q.k) = sum(queries * g_q) gives the
            # scale's gradient without another pass over the chunks.
            g_q = torch.zeros(queries.shape, dtype=stat, device=queries.device)
            g_k = torch.zeros(keys.shape, dtype=stat, device=keys.device)
            scratch = _Scratch(2, min(chunk, queries.shape[0]), min(chunk, keys.shape[0]), stat, queries.device)
            for i0, i1 in _ranges(queries.shape[0], chunk):
                q = queries[i0:i1]
                q_scaled = q * logit_scale.to(q.dtype)
                for j0, j1 in _ranges(keys.shape[0], chunk):
                    k = keys[j0:j1]
                    logits = _scores(q_scaled, k, scratch(0, i1 - i0, j1 - j0))
                    _mask_same_labels(logits, ctx.query_labels, ctx.key_labels, i0, i1, j0, j1, offset + i0 - j0)
                    dlogits = torch.sub(logits, row_max[i0:i1, None], out=scratch(1, i1 - i0, j1 - j0))
                    dlogits.exp_().mul_(row_factor[i0:i1, None])
                    if columns:
                        dlogits.addcmul_(logits.sub_(col_max[j0:j1]).exp_(), col_factor[j0:j1])
                    # The one-hot targets of this chunk lie on one diagonal: query i0+r's
                    # positive is key offset+i0+r, i.e. chunk column r + (offset+i0-j0).
                    dlogits.diagonal(offset + i0 - j0).sub_(positive_grad)
                    _accumulate_mm(g_q[i0:i1], dlogits, k)
                    _accumulate_mm(g_k[j0:j1], dlogits.T, q)
            scale = logit_scale.to(stat)
            grad_scale = _frobenius(queries, g_q).to(logit_scale.dtype) if ctx.needs_input_grad[2] else None
            grad_queries = g_q.mul_(scale).to(queries.dtype) if ctx.needs_input_grad[0] else None
            grad_keys = g_k.mul_(scale).to(keys.dtype) if ctx.needs_input_grad[1] else None
        return grad_queries, grad_keys, grad_scale, None, None, None, None, None


class _ChunkedSigmoid(torch.autograd.Function):
    """Summed pairwise sigmoid loss of queries against keys, chunked.

    forward(queries [B, D], keys [N, D], logit_scale, logit_bias, label_offset, chunk, columns)
    -> (loss sum, row top-1 hits, column top-1 hits).
    logits = logit_scale * queries @ keys.T + logit_bias; label +1 at (i, label_offset + i),
    -1 elsewhere; loss sum = -sum logsigmoid(label * logits). Column hits (top-1 of each
    key over the queries) only with columns=True (N == B, offset 0), else 0.
    """

    @staticmethod
    def forward(ctx, queries, keys, logit_scale, logit_bias, label_offset: int, chunk: int, columns: bool):
        with _no_autocast(queries.device):
            stat = _stat_dtype(queries.dtype)
            rows, n, device = queries.shape[0], keys.shape[0], queries.device
            bias = logit_bias.to(stat)
            row_top = _Top1(rows, stat, device)
            col_top = _Top1(n if columns else 0, stat, device)
            positive = torch.empty(rows, dtype=stat, device=device)
            loss = torch.zeros((), dtype=stat, device=device)
            scratch = _Scratch(1, min(chunk, rows), min(chunk, n), stat, device)
            for i0, i1 in _ranges(rows, chunk):
                q = queries[i0:i1] * logit_scale.to(queries.dtype)
                for j0, j1 in _ranges(n, chunk):
                    logits = _scores(q, keys[j0:j1], scratch(0, i1 - i0, j1 - j0)).add_(bias)
                    diagonal = label_offset + i0 - j0
                    _copy_positives(positive, logits, diagonal, i0)
                    row_top.update(i0, i1, logits, 1, diagonal)
                    if columns:
                        col_top.update(j0, j1, logits, 0, diagonal)
                    # label * logits: negate everything, then flip the positives back.
                    signed = logits.neg_()
                    signed.diagonal(diagonal).neg_()
                    loss -= F.logsigmoid(signed).sum()
            row_hits = row_top.hits(positive)
            col_hits = col_top.hits(positive) if columns else row_hits.new_zeros(())
        ctx.save_for_backward(queries, keys, logit_scale, logit_bias)
        ctx.label_offset, ctx.chunk = label_offset, chunk
        ctx.mark_non_differentiable(row_hits, col_hits)
        return loss, row_hits, col_hits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_row_hits, _grad_col_hits):
        queries, keys, logit_scale, logit_bias = ctx.saved_tensors
        offset, chunk = ctx.label_offset, ctx.chunk
        with _no_autocast(queries.device):
            stat = _stat_dtype(queries.dtype)
            grad_loss, bias = grad_loss.to(stat), logit_bias.to(stat)
            g_q = torch.zeros(queries.shape, dtype=stat, device=queries.device)
            g_k = torch.zeros(keys.shape, dtype=stat, device=keys.device)
            g_bias = torch.zeros((), dtype=stat, device=queries.device)
            scratch = _Scratch(1, min(chunk, queries.shape[0]), min(chunk, keys.shape[0]), stat, queries.device)
            for i0, i1 in _ranges(queries.shape[0], chunk):
                q = queries[i0:i1]
                q_scaled = q * logit_scale.to(q.dtype)
                for j0, j1 in _ranges(keys.shape[0], chunk):
                    k = keys[j0:j1]
                    dlogits = _scores(q_scaled, k, scratch(0, i1 - i0, j1 - j0)).add_(bias)
                    # d/dx of -logsigmoid(label * x) is sigmoid(x) for negatives and
                    # -sigmoid(-x) for positives; computing the latter directly (rather than
                    # sigmoid(x) - 1) keeps confident positives as accurate as the dense loss.
                    positives = dlogits.diagonal(offset + i0 - j0)
                    positives.neg_()
                    dlogits.sigmoid_()
                    positives.neg_()
                    dlogits.mul_(grad_loss)
                    g_bias += dlogits.sum()
                    _accumulate_mm(g_q[i0:i1], dlogits, k)
                    _accumulate_mm(g_k[j0:j1], dlogits.T, q)
            scale = logit_scale.to(stat)
            grad_scale = _frobenius(queries, g_q).to(logit_scale.dtype) if ctx.needs_input_grad[2] else None
            grad_bias = g_bias.to(logit_bias.dtype) if ctx.needs_input_grad[3] else None
            grad_queries = g_q.mul_(scale).to(queries.dtype) if ctx.needs_input_grad[0] else None
            grad_keys = g_k.mul_(scale).to(keys.dtype) if ctx.needs_input_grad[1] else None
        return grad_queries, grad_keys, grad_scale, grad_bias, None, None, None


def _as_scalar(value: Tensor | float, like: Tensor) -> Tensor:
    return value if isinstance(value, Tensor) else torch.tensor(value, dtype=like.dtype, device=like.device)


def chunked_infonce(
    queries: Tensor,
    keys: Tensor,
    logit_scale: Tensor | float,
    *,
    label_offset: int = 0,
    chunk: int = DEFAULT_CHUNK,
    columns: bool = False,
    query_labels: Tensor | None = None,
    key_labels: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Summed InfoNCE cross-entropy over [chunk, chunk] blocks of logit_scale * queries @ keys.T.

    queries: [B, D]; keys: [N, D]; query i's positive is key label_offset + i.
    columns=True (needs N == B, label_offset 0) also scores every key against the queries
    (the other direction of the symmetric loss) from the same chunks.
    query_labels [B], key_labels [N]: optional class ids (< 0 = none); a query and a key of
    the same class other than its positive are then no negative (left out, as in
    `mmcl.losses.clip.same_label_mask`).
    Returns (row loss sum, column loss sum (0 without columns), row top-1 hits, column
    top-1 hits (0 without columns)); the sums are differentiable w.r.t. queries, keys and
    logit_scale, and equal the dense F.cross_entropy(..., reduction="sum").
    """
    _check_chunked_args(queries, keys, label_offset, chunk, columns)
    _check_labels(queries, keys, query_labels, key_labels)
    return _ChunkedInfoNCE.apply(queries, keys, _as_scalar(logit_scale, queries), label_offset, chunk, columns,
                                 query_labels, key_labels)


def chunked_sigmoid(
    queries: Tensor,
    keys: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    *,
    label_offset: int = 0,
    chunk: int = DEFAULT_CHUNK,
    columns: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Summed pairwise sigmoid loss over [chunk, chunk] blocks of logit_scale * queries @ keys.T + bias.

    queries: [B, D]; keys: [N, D]; pair (i, label_offset + i) is positive, all others negative.
    Returns (loss sum, row top-1 hits, column top-1 hits (only with columns=True, which
    needs N == B and label_offset 0; else 0)); the loss is differentiable w.r.t. queries,
    keys, logit_scale and logit_bias.
    """
    _check_chunked_args(queries, keys, label_offset, chunk, columns)
    return _ChunkedSigmoid.apply(
        queries, keys, _as_scalar(logit_scale, queries), _as_scalar(logit_bias, queries), label_offset, chunk, columns
    )


@torch.no_grad()
def chunked_top1_hits(queries: Tensor, keys: Tensor, label_offset: int = 0, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """How many query rows [B, D] score their positive key (row label_offset + i of [N, D]) highest.

    Scores are queries @ keys.T (a positive logit scale and any bias do not change the
    argmax), computed a [chunk, chunk] block at a time; ties go to the first maximum.
    """
    _check_chunked_args(queries, keys, label_offset, chunk, columns=False)
    stat = _stat_dtype(queries.dtype)
    top = _Top1(queries.shape[0], stat, queries.device)
    positive = torch.empty(queries.shape[0], dtype=stat, device=queries.device)
    for i0, i1 in _ranges(queries.shape[0], chunk):
        for j0, j1 in _ranges(keys.shape[0], chunk):
            scores = (queries[i0:i1] @ keys[j0:j1].T).to(stat)
            _copy_positives(positive, scores, label_offset + i0 - j0, i0)
            top.update(i0, i1, scores, 1, label_offset + i0 - j0)
    return top.hits(positive)
