"""GaLore's projector: the object galore-torch's optimizers call through ``state["projector"]``, and the top
singular vectors it projects on (exact SVD, or a randomized range finder). Part of the GaLore plugins
(:mod:`hf_lowmem_plugins.galore`, whose docstring explains the staggered refreshes and the randomized first
projector). ``python -m hf_lowmem_plugins.galore_projector [--threads N]`` measures the SVD against the
randomized finder on this machine.
"""

from __future__ import annotations

import time

PROJ_METHODS = ("svd", "randomized")


class GaLoreProjector:
    """Projects a gradient matrix to rank ``rank`` and back; galore-torch's optimizers call
    :meth:`project` and :meth:`project_back`. Holds only tensors, numbers and strings, so it survives
    ``torch.load(weights_only=True)`` (the class is registered as a safe global).

    ``t`` counts the projections computed (one per optimizer step). A refresh is due when there is no
    basis yet or when ``t > 0`` and ``(t + offset) % gap == 0``. ``refreshes`` records ``(t, method)``.
    ``pending``, when set, is returned by the next :meth:`project` call instead of a new projection (the
    layer-wise clipping path projects inside backward and steps after it).
    """

    def __init__(self, rank: int, gap: int, scale: float, proj_type: str, method: str, init_method: str,
                 offset: int = 0, oversample: int = 8, power_iters: int = 2, seed: int = 0, index: int = 0,
                 name: str = ""):
        self.name = name  # the parameter's name, for messages
        self.rank, self.gap, self.scale, self.proj_type = rank, gap, float(scale), proj_type
        self.method, self.init_method = method, init_method
        self.offset, self.oversample, self.power_iters, self.seed, self.index = offset, oversample, power_iters, seed, index
        self.t = 0
        self.side: str | None = None  # "left", "right" or "full"
        self.basis = None  # left: U (m x r); right: Vh (r x n); full: U
        self.basis2 = None  # full: Vh
        self.pending = None
        self.refreshes: list[tuple[int, str]] = []

    # -- what galore-torch calls ------------------------------------------------------------------------
    def project(self, full_rank_grad, iter=None):  # noqa: A002 - galore-torch's parameter name
        if self.pending is not None:
            low, self.pending = self.pending, None
            return low
        g = full_rank_grad
        if self.due():
            self.refresh(g)
        self.t += 1
        return self.down(g)

    def project_back(self, low_rank_grad):
        import torch

        if self.side == "right":
            full = torch.matmul(low_rank_grad, self.basis)
        elif self.side == "left":
            full = torch.matmul(self.basis, low_rank_grad)
        else:
            full = torch.matmul(self.basis, low_rank_grad) @ self.basis2
        return full * self.scale

    # -- ours ---------------------------------------------------------------------------------------------
    def due(self) -> bool:
        return self.basis is None or (self.t > 0 and (self.t + self.offset) % self.gap == 0)

    def down(self, g):
        import torch

        if self.side == "right":
            return torch.matmul(g, self.basis.t())
        if self.side == "left":
            return torch.matmul(self.basis.t(), g)
        return torch.matmul(self.basis.t(), g) @ self.basis2.t()

    def _side_for(self, shape) -> str:
        m, n = shape
        if self.proj_type == "std":
            return "right" if m >= n else "left"
        if self.proj_type == "reverse_std":
            return "left" if m >= n else "right"
        return self.proj_type

    def refresh(self, g) -> None:
        import torch

        if not bool(torch.isfinite(g).all()):  # the SVD / eigh would fail with a LinAlgError naming nothing
            from hf_lowmem.errors import PluginError

            what = getattr(self, "name", "") or f"GaLore target matrix {self.index}"
            raise PluginError(f"GaLore: the gradient of {what} is not finite (NaN or inf) at optimizer step "
                              f"{self.t + 1}, so no projection can be computed from it; lower the learning rate, "
                              "check the data and the model's weights for NaN/inf")
        method = effective_method(self.init_method if self.basis is None else self.method, self.rank, g.shape,
                                  self.oversample)
        self.side = self._side_for(g.shape)
        u, vh = top_singular_vectors(g, self.rank, method, want=self.side, oversample=self.oversample,
                                     power_iters=self.power_iters, seed=(self.seed, self.index, self.t))
        if self.side == "right":
            self.basis, self.basis2 = vh.to(g.dtype), None
        elif self.side == "left":
            self.basis, self.basis2 = u.to(g.dtype), None
        else:
            self.basis, self.basis2 = u.to(g.dtype), vh.to(g.dtype)
        self.refreshes.append((self.t, method))


def effective_method(method: str, rank: int, shape, oversample: int) -> str:
    """The method :func:`top_singular_vectors` really uses: ``randomized`` falls back to the exact ``svd``
    when its sketch (``min(rank, m, n) + oversample`` columns) is wider than half the matrix's smaller side,
    where sketching saves nothing."""
    m, n = shape
    return "svd" if method == "svd" or 2 * (min(rank, m, n) + oversample) > min(m, n) else method


def top_singular_vectors(g, rank: int, method: str, want: str = "full", oversample: int = 8, power_iters: int = 2,
                         seed: tuple = (0,)):
    """The top-``rank`` left singular vectors ``U`` (m x r) and right ones ``Vh`` (r x n) of ``g``, in fp32.

    ``method="svd"``: ``torch.linalg.svd`` (both sides). ``method="randomized"``: a randomized range finder
    with a private generator seeded from ``seed``, computing only the side ``want`` asks for (``"left"``:
    returns ``(U, None)``; ``"right"``: ``(None, Vh)``; ``"full"``: both). The finder sketches the range of
    ``a`` (``g``, or ``g^T`` for the right side) with ``k = rank + oversample`` Gaussian columns, runs
    ``power_iters`` QR-stabilised power iterations, then takes the top eigenvectors of the k x k Gram matrix
    ``B B^T`` of ``B = Q^T a`` (an ``eigh`` of k x k: on CPU, torch's SVD of the thin k x n matrix was up to
    30x slower). Falls back to the exact SVD when ``2 k > min(m, n)``, where sketching saves nothing.
    """
    import torch

    a = g.detach().float()
    m, n = a.shape
    r = min(rank, m, n)
    k = r + oversample
    if effective_method(method, rank, (m, n), oversample) == "svd":
        u, _, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :r], vh[:r]
    gen = torch.Generator(device=a.device)
    gen.manual_seed(_mix_seed(seed))
    sides = ("left", "right") if want == "full" else (want,)
    out = {}
    for side in sides:
        x = a.t() if side == "right" else a  # the wanted vectors are the left singular vectors of x
        omega = torch.randn(x.shape[1], k, generator=gen, device=x.device, dtype=x.dtype)
        q = torch.linalg.qr(x @ omega).Q
        for _ in range(power_iters):
            q = torch.linalg.qr(x.t() @ q).Q
            q = torch.linalg.qr(x @ q).Q
        b = q.t() @ x
        _, evecs = torch.linalg.eigh(b @ b.t())  # ascending eigenvalues sigma^2
        out[side] = q @ evecs[:, -r:].flip(-1)
    u = out.get("left")
    vh = out["right"].t() if "right" in out else None
    return u, vh


def _mix_seed(parts) -> int:
    h = 1469598103934665603
    for x in parts:
        h = ((h ^ (int(x) & 0xFFFFFFFF)) * 1099511628211) % (1 << 61)
    return h


# ------------------------------------------------------------------------------------------------
# measuring the projector cost: python -m hf_lowmem_plugins.galore_projector [--threads N]
# ------------------------------------------------------------------------------------------------

def measure_projection_cost(shapes=((512, 512), (1024, 1024), (1024, 2816), (2048, 2048)), rank_frac=0.25,
                            repeats=3, oversample=8, power_iters=2) -> list[dict]:
    """Time (best of ``repeats``, after a warm-up) one full SVD and one randomized range finder (the left
    basis, as for a wide matrix) per shape (fp32, this machine's default device and threads), and how much of the gradient's top-r energy the randomized basis captures on a matrix
    with a decaying spectrum (singular values 1/(1+i)^0.5 plus noise, like a gradient's)."""
    import torch

    rows = []
    for m, n in shapes:
        r = max(1, int(min(m, n) * rank_frac))
        gen = torch.Generator().manual_seed(0)
        k = min(m, n)
        u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
        s = 1.0 / torch.arange(1, k + 1, dtype=torch.float32).sqrt()
        g = (u * s) @ v.t() + 1e-3 * torch.randn(m, n, generator=gen)
        times = {}
        for method in PROJ_METHODS:
            top_singular_vectors(g, r, method, want="left", seed=(0,))  # warm-up (first calls initialise LAPACK)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                uu, vh = top_singular_vectors(g, r, method, want="left", oversample=oversample,
                                              power_iters=power_iters, seed=(1,))
                best = min(best, time.perf_counter() - t0)
            times[method] = best
            if method == "svd":
                exact = uu
            else:
                approx = uu
        energy = float((approx.t() @ g).square().sum() / (exact.t() @ g).square().sum())
        rows.append({"shape": (m, n), "rank": r, "svd_s": times["svd"], "randomized_s": times["randomized"],
                     "speedup": times["svd"] / times["randomized"], "energy_captured": energy})
    return rows


def _main(argv=None) -> int:
    import argparse

    import torch

    ap = argparse.ArgumentParser(prog="python -m hf_lowmem_plugins.galore_projector",
                                 description="Measure the cost of one GaLore projector refresh per matrix shape.")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rank-frac", type=float, default=0.25)
    ap.add_argument("--shapes", default="512x512,1024x1024,1024x2816,2048x2048")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, rank = {a.rank_frac} x min side")
    print("| shape | rank | full SVD (s) | randomized (s) | speed-up | top-r energy captured |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in measure_projection_cost(shapes, a.rank_frac):
        print(f"| {row['shape'][0]}x{row['shape'][1]} | {row['rank']} | {row['svd_s']:.3f} | {row['randomized_s']:.3f} | "
              f"{row['speedup']:.1f}x | {row['energy_captured']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
