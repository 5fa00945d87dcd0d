"""Train one model on the prepared data and save it with its test metrics."""

import argparse
import json
import os
import pickle

import numpy as np
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cairn import Run

MODELS = {
    "logistic_regression": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
    "random_forest": lambda: RandomForestClassifier(n_estimators=200, random_state=0),
    "gradient_boosting": lambda: GradientBoostingClassifier(random_state=0),
}

parser = argparse.ArgumentParser()
parser.add_argument("--data", required=True)
parser.add_argument("--model", required=True, choices=sorted(MODELS))
parser.add_argument("--output", required=True)
args = parser.parse_args()

train = np.loadtxt(os.path.join(args.data, "train.csv"), delimiter=",")
test = np.loadtxt(os.path.join(args.data, "test.csv"), delimiter=",")
model = MODELS[args.model]().fit(train[:, :-1], train[:, -1])
predicted = model.predict(test[:, :-1])
metrics = {"model": args.model, "accuracy": float(accuracy_score(test[:, -1], predicted)),
           "f1": float(f1_score(test[:, -1], predicted))}
print(json.dumps(metrics))

os.makedirs(args.output, exist_ok=True)
with open(os.path.join(args.output, "model.pkl"), "wb") as f:
    pickle.dump(model, f)
with open(os.path.join(args.output, "metrics.json"), "w") as f:
    json.dump(metrics, f)

run = Run.get_context()
run.log("accuracy", metrics["accuracy"])
run.log("f1", metrics["f1"])
run.tag("model", args.model)
