"""Small PCA and Procrustes problems with known optima, shared by the optimizer tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PCA:
    """F(X) = −½ tr(XᵀAX) on St(n, p); the minimum −½ Σ top-p eigenvalues is reached on the top-p eigenspace."""

    a: torch.Tensor
    p: int

    @classmethod
    def make(cls, n: int, p: int, *, dtype=torch.float64, seed: int = 0, low: float = -1.0) -> "PCA":
        generator = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
        eigenvalues = 10.0 * torch.logspace(low, 0.0, n, dtype=torch.float64)
        return cls(((q * eigenvalues) @ q.T).to(dtype), p)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return -0.5 * torch.trace(x.mT @ self.a.to(x.dtype) @ x)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        return -(self.a.to(x.dtype) @ x)

    def optimum(self) -> float:
        eigenvalues, _ = torch.linalg.eigh(self.a.to(torch.float64))
        return -0.5 * eigenvalues[-self.p:].sum().item()

    def top_eigenvectors(self) -> torch.Tensor:
        _, vectors = torch.linalg.eigh(self.a.to(torch.float64))
        return vectors[:, -self.p:]

    def relative_gap(self, x: torch.Tensor) -> float:
        """(F(X̄) − F*)/|F*| at the projected point X̄ (polar), in float64."""
        from optim.stiefel import project_to_manifold

        x_bar = project_to_manifold(x.detach()).to(torch.float64)
        best = self.optimum()
        return (self.loss(x_bar).item() - best) / abs(best)


@dataclass
class Procrustes:
    """F(X) = ½‖X − B‖_F² on St(n, p); the minimizer is the polar factor of B."""

    b: torch.Tensor

    @classmethod
    def make(cls, n: int, p: int, *, dtype=torch.float64, seed: int = 0) -> "Procrustes":
        generator = torch.Generator().manual_seed(seed)
        return cls(torch.randn(n, p, dtype=torch.float64, generator=generator).to(dtype))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (x - self.b.to(x.dtype)).square().sum()

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.b.to(x.dtype)

    def solution(self) -> torch.Tensor:
        u, _, vh = torch.linalg.svd(self.b.to(torch.float64), full_matrices=False)
        return u @ vh

    def relative_gap(self, x: torch.Tensor) -> float:
        from optim.stiefel import project_to_manifold

        x_bar = project_to_manifold(x.detach()).to(torch.float64)
        best = self.loss(self.solution()).item()
        return (self.loss(x_bar).item() - best) / abs(best)


def run_steps(optimizer, x: torch.Tensor, problem, steps: int) -> None:
    """``steps`` optimizer steps on ``problem`` with the closed-form gradient (no autograd: fast)."""
    for _ in range(steps):
        x.grad = problem.grad(x.detach())
        optimizer.step()
