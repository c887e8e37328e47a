from llmslim.cli import app

app(prog_name="llmslim")
