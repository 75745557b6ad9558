# Hand-written probe (no crash found): router weights built from empty or starred shapes; empty and starred tuple returns.
from torch import nn
class R(nn.Module):
    def __init__(self): self.weight = nn.Parameter(torch.empty(())); self.weight = nn.Parameter(); self.weight = nn.Parameter(torch.empty(*s))
    def forward(self): return ()
    def compute(self): return (*a,)
class E(nn.Module): pass
class MoE(nn.Module):
    def __init__(self): self.experts = E(); self.gate = R(); self.router = R
class L(nn.Module):
    def __init__(self): self.mlp = MoE()
    def forward_attn(self, hidden_states): return ForwardAttnOutput()
