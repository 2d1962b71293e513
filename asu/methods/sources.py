"""Where the methods' definitions and defaults come from: the reference implementations, by file.

``AUTHORS``: the ASU authors' trainer (github.com/Salehzz/ASU-unlearning), the reference for ASU and the
baselines of the paper's tables. ``OU``: open-unlearning (github.com/locuslab/open-unlearning), the reference
for the field's baselines and their default hyper-parameters.
"""

AUTHORS = "Salehzz/ASU-unlearning"
AUTHORS_LOSSES = f"{AUTHORS}: Right-to-be-forgotten/trainer/losses.py"
AUTHORS_TOFU = f"{AUTHORS}: Right-to-be-forgotten/config/tofu.yaml"
AUTHORS_TOFU_ASU = f"{AUTHORS}: Right-to-be-forgotten/scripts/tofu/asu.sh"
OU = "locuslab/open-unlearning"
OU_UTILS = f"{OU}: src/trainer/utils.py"
#: open-unlearning's WMDP experiment (RMU's defaults).
OU_WMDP = f"{OU}: configs/experiment/unlearn/wmdp/default.yaml"


def ou_trainer(name: str) -> str:
    """open-unlearning's trainer file of a method (``src/trainer/unlearn/<name>.py``)."""
    return f"{OU}: src/trainer/unlearn/{name}.py"


def ou_config(name: str) -> str:
    """open-unlearning's trainer config of a method (``configs/trainer/<name>.yaml``)."""
    return f"{OU}: configs/trainer/{name}.yaml"
