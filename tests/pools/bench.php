<?php
// The no-op task code of warren-bench's `pool` scenario (docs/benchmarks.md): `echo` returns its
// arguments, `bench_count` does nothing. What is measured is the pool's path, not PHP work.
declare(strict_types=1);

require __DIR__ . '/../../runners/php/warren.php';

Warren\serve([
    'echo' => fn ($args) => $args,
    'bench_count' => fn () => null,
]);
