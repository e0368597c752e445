from analysis.latency.cli import main

main()
