"""lm-eval task configs for kvpress's offline long-context families (YAML) and the functions they call (utils).

The launcher passes this directory to lm-eval as `--include_path`; see utils.py for the dataset options.
"""
