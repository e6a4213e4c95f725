DROP TABLE allocations;
DROP TABLE instances;
DROP TABLE gpus;
DROP TABLE workers;
