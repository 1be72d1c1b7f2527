"""The benchmarks' pipelines: the demo (emoji, Openclipart) and the ablation studies."""
