import os
import sys
from pathlib import Path

# No test may reach the network: the Hugging Face hub client stays offline unless a test serves a fake hub.
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).parent))
