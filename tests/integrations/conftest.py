import sys
from pathlib import Path

# timm_like.py is imported by the tests here and by gpu_check's timm section.
sys.path.insert(0, str(Path(__file__).parent))
