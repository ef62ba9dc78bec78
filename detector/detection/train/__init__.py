"""Training a detector: the stage plan (`stages`, torch-free), the code of each stage and the
loop over them (`pipeline`), fine-tuning the fc layers (`finetune`) and the SVM and
box-regression rows kept on disk (`rows`)."""
