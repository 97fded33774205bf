"""Model repositories: the download presets (`presets`), fetching with manifests (`downloads`), LoRA uploads."""
