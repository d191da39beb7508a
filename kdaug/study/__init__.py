"""`kdaug study`: the paper's comparison (Table 3) for one teacher-student pair on any data.

From a `StudyConfig` (configs/studies/*.yml): train (or load) the teacher, train the baseline student
and a student per KD strategy, per kind of extra data made with the trained teacher and per online
augmentation, each over several seeds and data regimes (`regimes`: the share of the ground-truth systems the
students see, the synthetic frames per ground-truth frame), evaluate all on the same held-out sets and against
the teacher's labels on them, and tabulate. Every run stops early (`train.early_stopping`); the table gives its
steps and marks results of runs whose validation had not plateaued.

Study folder (`out`)::

    out/
      data/dft-train, dft-val     the generated ground truth (when data.generate asks for it)
      data/generate, rattle/...   synthetic data made with the trained teacher (the data arms: generate,
                                  rattle, adversarial, onpolicy; disagreement selects from generate)
      data/regimes/               the students' share of the ground truth and the scaled synthetic subsets
      data/teacher-val/<set>/     each held-out set labelled by the teacher (student-vs-teacher MAE)
      teacher/                    the teacher's kdaug train run (+ result.json)
      runs/<label>/seed<k>/       each student run: checkpoint.pt, student.pt, log.jsonl, curves.png,
                                  result.json (written last: the run is finished)
      results.md, results.json    the table per validation set (mean, spread, gap closed)
      gap_closed.png              gap closed per run and metric
      gap_vs_scale.png            gap closed against regimes.synthetic_scale per data arm and regime
      learning_curves.png         validation MAEs against step for every run
      cka/                        teacher-student CKA of the baseline and each run's gain over it

Rerunning skips finished runs (result.json with the same options); a killed run resumes from its
checkpoint (kdaug train), the generators resume their LMDBs; a data folder is made once (done.json).
"""
