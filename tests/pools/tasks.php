<?php
// Task code of the pool tests (tests/e2e/pools.rs): each function exercises one way a PHP
// process can succeed, fail or die.
declare(strict_types=1);

require __DIR__ . '/../../runners/php/warren.php';

$hog = [];
$subprocesses = [];

Warren\serve([
    'add' => fn (array $args) => ['sum' => $args['a'] + $args['b'], 'pid' => getmypid()],
    'pid' => fn () => getmypid(),
    'context' => fn ($args, Warren\Context $ctx) => [
        'id' => $ctx->id,
        'function' => $ctx->function,
        'attempt' => $ctx->attempt,
        'max_attempts' => $ctx->maxAttempts,
        'has_deadline' => $ctx->deadline !== null,
    ],
    'boom' => function () {
        echo "about to throw\n";
        throw new RuntimeException('boom');
    },
    'refuse' => function () {
        throw new Warren\Permanent('amount must be positive', 'invalid_args');
    },
    // Dies on its first attempt, succeeds on the next one (on a fresh process).
    'exit_first' => function ($args, Warren\Context $ctx) {
        if ($ctx->attempt === 1) {
            exit(1);
        }
        return getmypid();
    },
    'always_exit' => function () {
        exit(1);
    },
    // A real fatal error (memory exhausted) on the first attempt.
    'fatal_first' => function ($args, Warren\Context $ctx) {
        if ($ctx->attempt === 1) {
            ini_set('memory_limit', '16M');
            $s = str_repeat('x', 64 << 20);
            return strlen($s);
        }
        return getmypid();
    },
    // Writes its pid to a file, then waits to be killed; succeeds on the next attempt.
    'hang_first' => function (array $args, Warren\Context $ctx) {
        if ($ctx->attempt === 1) {
            file_put_contents($args['pidfile'] . '.tmp', (string) getmypid());
            rename($args['pidfile'] . '.tmp', $args['pidfile']);
            sleep(60);
        }
        return getmypid();
    },
    'spin' => function () {
        while (true) {
        }
    },
    // Keeps 8 MB more per call, so that its process crosses max_memory.
    'grow' => function (array $args) use (&$hog) {
        $hog[] = str_repeat(chr(65 + count($hog) % 26), 8 << 20);
        return ['n' => $args['n'], 'pid' => getmypid()];
    },
    // Writes garbage to stdout on its first attempt.
    'garbage_first' => function ($args, Warren\Context $ctx) {
        if ($ctx->attempt === 1) {
            fwrite(Warren\Runner::$out, "this is not a frame\n");
            sleep(5);
        }
        return getmypid();
    },
    // Garbage on stdout the first time it runs anywhere (`marker` does not exist yet).
    'garbage_once' => function (array $args, Warren\Context $ctx) {
        if (!file_exists($args['marker'])) {
            touch($args['marker']);
            fwrite(Warren\Runner::$out, "this is not a frame\n");
            sleep(5);
        }
        return ['attempt' => $ctx->attempt, 'pid' => getmypid()];
    },
    // The variables named in `names` as the task code sees them (null when unset).
    'env' => fn (array $args) => array_combine(
        $args['names'],
        array_map(static fn (string $n) => getenv($n) === false ? null : getenv($n), $args['names']),
    ),
    // Starts `sleep 600` with this process's fds 0, 1 and 2; returns its pid or, with `hang`,
    // writes it to `pidfile` and never returns.
    'spawn_sleep' => function (array $args) use (&$subprocesses) {
        $subprocesses[] = $process = proc_open(['sleep', '600'], [], $pipes);
        $pid = proc_get_status($process)['pid'];
        if (isset($args['pidfile'])) {
            file_put_contents($args['pidfile'], (string) $pid);
        }
        while ($args['hang'] ?? false) {
            sleep(1);
        }
        return $pid;
    },
    'die' => fn () => exit(3),
    // Says it has `started`; once `go` exists, runs `cat` with this process's stdin for a
    // second; returns the bytes it read and whether `go` was seen.
    'read_stdin' => function (array $args) {
        touch($args['started']);
        for ($i = 0; $i < 1000 && !($go = file_exists($args['go'])); $i++) {
            usleep(10000);
        }
        return ['read' => strlen((string) shell_exec('timeout 1 cat')), 'go' => $go];
    },
    'big' => fn (array $args) => str_repeat('x', $args['n']),
    // Reports `steps` updates in percent, with a message, then answers with `steps`.
    'progress' => function (array $args, Warren\Context $ctx) {
        for ($i = 1; $i <= $args['steps']; $i++) {
            $ctx->progress(['percent' => 100 * $i / $args['steps'], 'message' => "step $i"]);
        }
        return $args['steps'];
    },
    'sleep' => function (array $args) {
        if (isset($args['started'])) {
            file_put_contents($args['started'], getmypid() . "\n", FILE_APPEND | LOCK_EX);
        }
        usleep((int) $args['ms'] * 1000);
        return getmypid();
    },
    // Waits up to `seconds` for the worker to write the next task to this process's stdin while
    // this one runs (a pool's prefetch); once it is there, with `exit` exits, and with `fatal`
    // dies of a PHP fatal error (the helper answers `crashed` for this task, then PHP exits).
    'next_waiting' => function (array $args) {
        file_put_contents($args['started'] . '.tmp', (string) getmypid());
        rename($args['started'] . '.tmp', $args['started']);
        $read = [Warren\Runner::$in];
        $none = null;
        $waiting = stream_select($read, $none, $none, (int) $args['seconds']) === 1;
        if ($waiting && ($args['exit'] ?? false)) {
            exit(1);
        }
        if ($waiting && ($args['fatal'] ?? false)) {
            ini_set('memory_limit', '16M');
            $s = str_repeat('x', 64 << 20);
            return strlen($s);
        }
        return ['waiting' => $waiting, 'pid' => getmypid()];
    },
    // A line longer than the worker logs and a line that is not UTF-8 on stderr, then more
    // than a pipe holds: every write must go through (a worker that stopped reading stderr
    // would close the pipe on it).
    'stderr_flood' => function () {
        $ok = fwrite(STDERR, str_repeat('y', 70000) . "\n") !== false;
        $ok = fwrite(STDERR, "\xff\xfe not utf-8\n") !== false && $ok;
        for ($i = 0; $i < 100; $i++) {
            $ok = fwrite(STDERR, str_repeat('x', 1024) . "\n") !== false && $ok;
        }
        return ['ok' => $ok, 'pid' => getmypid()];
    },
]);
