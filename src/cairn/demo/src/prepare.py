"""Load the breast-cancer data set shipped with scikit-learn and split it into train and test files."""

import argparse
import os

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

from cairn import Run

parser = argparse.ArgumentParser()
parser.add_argument("--output", required=True)
parser.add_argument("--test-size", type=float, default=0.25)
args = parser.parse_args()

data = load_breast_cancer()
x_train, x_test, y_train, y_test = train_test_split(
    data.data, data.target, test_size=args.test_size, random_state=42, stratify=data.target)
os.makedirs(args.output, exist_ok=True)
np.savetxt(os.path.join(args.output, "train.csv"), np.column_stack([x_train, y_train]), delimiter=",", fmt="%.6g")
np.savetxt(os.path.join(args.output, "test.csv"), np.column_stack([x_test, y_test]), delimiter=",", fmt="%.6g")
print(f"wrote {len(y_train)} training and {len(y_test)} test rows with {data.data.shape[1]} features")

run = Run.get_context()
run.log("train_rows", len(y_train))
run.log("test_rows", len(y_test))
