"""What finding a cell's inputs costs on every submit: the flow-sensitive analysis
(`cellcode.free_names`) of a realistic training cell, against what any run pays anyway to
parse and compile the same cell, measured in the same run.

    python benchmarks/cell_inputs.py [--repeat 200]
"""

from __future__ import annotations

import argparse
import ast

from _common import ratio_line, summary, timed

from lepton_magic import cellcode

# A DDP training cell of the kind the tutorials hold (70 lines: imports, a model class, a
# dataset, a loop with nested functions and comprehensions).
CELL = '''
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

dist = lepton.init_distributed()
torch.manual_seed(seed)


class Net(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))

    def forward(self, x):
        return self.body(x)


class Shard(Dataset):
    def __init__(self, X, y):
        self.X, self.y = X[lepton.rank::lepton.world_size], y[lepton.rank::lepton.world_size]

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i], self.y[i]


def accuracy(logits, y):
    return (logits.argmax(dim=1) == y).float().mean().item()


model = Net(width)
ddp = DDP(model)
optimizer = torch.optim.Adam(ddp.parameters(), lr=lr)
loader = DataLoader(Shard(X_train, y_train), batch_size=batch_size, shuffle=True)
step = 0
for epoch in range(epochs):
    for xb, yb in loader:
        optimizer.zero_grad()
        logits = ddp(xb)
        loss = F.cross_entropy(logits, yb)
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            lepton.log(step=step, loss=loss.item(), acc=accuracy(logits, yb))
        step += 1
    with torch.no_grad():
        val = [accuracy(model(xv), yv) for xv, yv in [(X_val, y_val)]]
    lepton.log(step=step, val_acc=sum(val) / len(val))
    if (best := max(val)) > threshold:
        print(f"epoch {epoch}: {best:.3f}")
counts = {k: int(v) for k, v in zip(*torch.unique(y_train, return_counts=True))}
try:
    final = evaluate(model)
except NameError as e:
    final = None
train_acc = accuracy(model(X_train), y_train)
'''


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    source = cellcode.padded_source(CELL)
    tree = cellcode.check_syntax(CELL)
    print(f"inputs of a {CELL.count(chr(10))}-line cell: {cellcode.free_names(tree)}")
    ours = summary("free_names (flow-sensitive)", timed(lambda: cellcode.free_names(tree), args.repeat))
    base = summary("ast.parse + compile of the cell", timed(
        lambda: compile(ast.parse(source), "<cell>", "exec"), args.repeat))
    ratio_line("input analysis vs parse+compile", ours, base, "≤ 2x of what every run pays anyway")


if __name__ == "__main__":
    main()
