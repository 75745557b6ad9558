# Hand-written probe (no crash found): a class that is its own mlp, experts, gate and layers (the structure graph has a cycle).
class L(nn.Module):
    def __init__(self): self.mlp = L(); self.experts = L(); self.gate = L(); self.layers = L()
    def forward_attn(self, hidden_states): return self.mlp.gate.experts.forward_attn(hidden_states)
    def forward(self, x): return self.mlp(x)
