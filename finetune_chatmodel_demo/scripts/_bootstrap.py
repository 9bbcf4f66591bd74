"""Lets the scripts of this folder import the drop-in folder's own modules (chatglm3, launching, cli), also when the
folder was copied alone into a ChatGLM3 checkout and nothing was installed. The folder's only sys.path edit:
the copy's own library is put first, so a copied folder never runs another copy's code."""
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1]
if (DEMO / "chatglm3").is_dir() and str(DEMO) not in sys.path:
    sys.path.insert(0, str(DEMO))
