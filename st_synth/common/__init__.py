"""Settings parsing, names of files and stages, languages, the task taxonomy and run-once preparation: what every stage below shares. Imports nothing else from st_synth."""
