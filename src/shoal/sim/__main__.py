from shoal.sim.scenario import main

main()
