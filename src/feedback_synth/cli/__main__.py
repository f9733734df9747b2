from feedback_synth.cli import console_main

console_main()
