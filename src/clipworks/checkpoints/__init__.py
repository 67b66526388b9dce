"""Reading, converting and writing weights in clipworks, OpenAI/OpenCLIP and transformers layouts."""
