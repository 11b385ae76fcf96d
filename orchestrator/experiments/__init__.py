"""Experiments: a base job, its variants and seeds, run as Ray Tune trials and compared against a control.

``plan`` reads an experiment file (or a ``xcm sweep`` grid) into one checked job spec per (variant, seed);
``tuning`` runs them as Ray Tune trials, each an xcm training run logged as a child of one MLflow parent run;
``statistics`` compares the variants with the control over seeds (pure numpy/scipy); ``report`` reads the
child runs back from MLflow and writes the comparison (Markdown, Parquet, PNG) into the parent run.
"""
