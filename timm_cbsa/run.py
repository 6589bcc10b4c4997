"""Run any of timm's command-line scripts with the CBSA models registered.

timm's scripts (``benchmark.py``, ``validate.py``, ``inference.py``, ``onnx_export.py``, ...) build models with
``timm.create_model`` but have no flag to import a plugin, so ``--model cbsa_vit_small_patch16_224`` or
``--model-kwargs attn_layer=cbsa`` are unknown to them. This runner imports ``timm_cbsa`` (which registers the
``cbsa_vit_*`` / ``cbt_*`` models and the CBSA ``attn_layer`` strings), then runs the script as ``__main__``::

    python -m timm_cbsa.run validate.py --model cbsa_vit_tiny_patch16_224 --data-dir DIR ...
    timm-cbsa-run validate.py --model cbsa_vit_tiny_patch16_224 --data-dir DIR ...   # console script, same thing

The script sees exactly what ``python SCRIPT.py ARGS...`` would give it: ``sys.argv`` is ``[SCRIPT.py, ARGS...]``
(untouched), the script's folder is ``sys.path[0]``, and its exit status (``sys.exit(3)`` → 3), exceptions and
KeyboardInterrupt pass through unchanged. One difference: ``timm`` is imported (by ``timm_cbsa``) before the script
runs, from wherever Python finds it first: run from outside a pytorch-image-models checkout, passing the script's path,
and the installed timm is used; from inside the checkout ``python -m`` puts the current folder first, so the checkout's
``timm/`` folder is used, as ``python SCRIPT.py`` there would.
"""
import os
import runpy
import sys
from typing import List, Optional

__all__ = ['main', 'run_script', 'ScriptNotFoundError']

USAGE = ('usage: python -m timm_cbsa.run SCRIPT.py [ARGS...]\n'
         "Runs a timm script (benchmark.py, validate.py, inference.py, train.py, ...) with timm_cbsa's models "
         'registered; ARGS go to the script unchanged.')


class ScriptNotFoundError(FileNotFoundError):
    """The script given to the runner is not a file."""


def run_script(script: str, args: List[str]) -> None:
    """Import timm_cbsa, then run ``script`` as ``__main__`` the way ``python SCRIPT.py ARGS...`` would: this process's
    ``sys.argv`` becomes ``[script, *args]`` and ``sys.path[0]`` the script's folder. Whatever the script raises
    (SystemExit, KeyboardInterrupt, errors) propagates unchanged.

    Raises:
        ScriptNotFoundError: ``script`` is not a file (nothing was changed or run).
    """
    if not os.path.isfile(script):
        what = 'is a folder, not a script' if os.path.isdir(script) else 'does not exist'
        raise ScriptNotFoundError(
            f'timm_cbsa.run: {script!r} {what}. Pass the path of a timm script, e.g. '
            'pytorch-image-models/validate.py (timm\'s scripts are in its git repository, not in the pip package).')
    import timm_cbsa  # noqa: F401  (registers cbsa_vit_* / cbt_* and the CBSA attn_layer strings)
    folder = os.path.dirname(os.path.abspath(script))
    sys.argv = [script, *args]
    if sys.path and sys.path[0] != folder:
        sys.path[0] = folder   # where `python SCRIPT.py` puts the script's folder (replaces cwd / our bin dir)
    runpy.run_path(script, run_name='__main__')


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        sys.exit(2 if not argv else 0)
    try:
        run_script(argv[0], argv[1:])
    except ScriptNotFoundError as e:
        print(f'{e}\n{USAGE}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
