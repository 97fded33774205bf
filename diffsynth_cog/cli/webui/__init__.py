"""``diffsynth-cog webui``: a Gradio page, a long-video studio on the ``generate`` options.

* ``controls``: which options the page shows and how (from the ``generate`` parser and the options' registries);
* ``jobs``: the server's job queue (shared by every tab, reload-safe, Stop at the next step);
* ``bridge``: a job's form -> the CLI's arguments -> ``GenerationOptions`` -> the pipeline -> a video with its
  settings; errors in the page's words;
* ``models``: the command line's pipeline factory, the models / LoRAs / kernels this machine offers;
* ``views``: the HTML panels; ``page``: the layout and its events; ``command``: the subcommand.

Importing this package imports neither torch nor gradio (``diffsynth-cog --help`` stays fast).
"""

from diffsynth_cog.cli.webui.bridge import JobResult, ModelSetup, PipelineFactory, UIOptions, run_job
from diffsynth_cog.cli.webui.command import add_webui_command, cmd_webui
from diffsynth_cog.cli.webui.jobs import Job, JobQueue, JobStopped, PageError
from diffsynth_cog.cli.webui.page import build_ui, launch

__all__ = [
    "Job",
    "JobQueue",
    "JobResult",
    "JobStopped",
    "ModelSetup",
    "PageError",
    "PipelineFactory",
    "UIOptions",
    "add_webui_command",
    "build_ui",
    "cmd_webui",
    "launch",
    "run_job",
]
