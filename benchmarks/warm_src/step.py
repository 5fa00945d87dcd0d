"""A step that spends its start-up importing pandas and scikit-learn, then does a little work."""

import argparse
import os

import pandas as pd
from sklearn.linear_model import LinearRegression

parser = argparse.ArgumentParser()
parser.add_argument("--in", dest="inputs", action="append", default=[])
parser.add_argument("--out", required=True)
args = parser.parse_args()
frame = pd.DataFrame({"x": range(100), "y": [2 * i + 1 for i in range(100)]})
model = LinearRegression().fit(frame[["x"]], frame["y"])
os.makedirs(args.out, exist_ok=True)
with open(os.path.join(args.out, "coef.txt"), "w") as f:
    f.write(f"{model.coef_[0]:.3f}\n")
