<?php
/**
 * Warren runner for PHP (runner protocol 1, see docs/runners.md). One file, no Composer:
 * copy it next to your task code and
 *
 *     require __DIR__ . '/warren.php';
 *     Warren\serve([
 *         'send_mail' => function (array $args, Warren\Context $ctx) {
 *             // ... return anything json_encode can encode
 *         },
 *     ]);
 *
 * then run it in a pool: `warren-worker --exec 'php tasks.php' --exec-functions send_mail`.
 *
 * - A thrown exception fails the task and is retried (while attempts remain).
 *   Throw Warren\Permanent for a failure that another attempt cannot fix, or
 *   Warren\TaskError($message, $kind, $retryable) to choose the error kind the caller sees
 *   (e.g. 'invalid_args').
 * - $ctx->id, ->function, ->attempt, ->maxAttempts, ->redelivered, ->deadline (ms since the
 *   epoch, or null) and ->remaining() (seconds left, or null) describe the task.
 * - The protocol runs on descriptors of its own: STDIN and STDOUT are closed, fd 0 reads
 *   /dev/null and fd 1 is stderr, so whatever the task code echoes or a subprocess prints goes
 *   to the log (with the pool, pid and task id), and no subprocess reads task lines.
 *
 * Runs on PHP 8.1+ (Debian 12's php-cli 8.2) with no extension beyond json.
 */

declare(strict_types=1);

namespace Warren;

/** A task failure with the error kind and retry advice the caller sees. */
class TaskError extends \Exception
{
    public function __construct(
        string $message,
        public readonly string $kind = 'handler_failed',
        public readonly bool $retryable = true,
    ) {
        parent::__construct($message);
    }
}

/** A failure that another attempt cannot fix: the task is dead-lettered at once. */
class Permanent extends TaskError
{
    public function __construct(string $message, string $kind = 'handler_failed')
    {
        parent::__construct($message, $kind, false);
    }
}

/** What a handler may want to know about its task. */
final class Context
{
    public function __construct(
        public readonly string $id,
        public readonly string $function,
        public readonly int $attempt,
        public readonly int $maxAttempts,
        public readonly bool $redelivered,
        public readonly ?int $deadline,
    ) {
    }

    /** Seconds until the caller's deadline, or null when it set none. */
    public function remaining(): ?float
    {
        return $this->deadline === null ? null : $this->deadline / 1000 - microtime(true);
    }

    /**
     * Reports how far the task has got, to the caller waiting for it: `fraction` (0 to 1) or
     * `percent` (0 to 100), `message` (a string, at most 1 KiB), `detail` (any JSON, at most
     * 4 KiB); other keys are ignored. Each call writes one line; the worker sends the caller at
     * most four updates a second (the latest wins) and the last one before the result.
     */
    public function progress(array $progress): void
    {
        Runner::write(['type' => 'progress', 'id' => $this->id] + $progress);
    }
}

/** @internal */
final class Runner
{
    public const PROTOCOL = 1;
    public static ?string $current = null;
    /** @var resource|null the protocol's input (the worker's task lines) */
    public static $in = null;
    /** @var resource|null the protocol's output (frames) */
    public static $out = null;
    /** @var list<resource> what now sits on fds 0 and 1, kept open */
    private static array $stdio = [];

    /**
     * Moves the protocol off fds 0 and 1. PHP cannot dup2, but it can dup (php://fd/N) and
     * close STDIN and STDOUT, and the next open takes the lowest free descriptor: fd 0 becomes
     * /dev/null and fd 1 a copy of stderr. Subprocesses (exec, system, proc_open) then inherit
     * those instead of the protocol's pipes. The copies of the pipes are not close-on-exec (PHP
     * cannot set it), but nothing reads or writes a descriptor above 2 unless told to.
     */
    public static function openProtocol(): void
    {
        self::$in = fopen('php://fd/0', 'r');
        self::$out = fopen('php://fd/1', 'w');
        if (self::$in === false || self::$out === false) {
            // No /proc-less fallback is needed on Linux; keep the standard streams.
            self::$in = STDIN;
            self::$out = STDOUT;
            return;
        }
        fclose(STDIN);
        self::$stdio[] = fopen('/dev/null', 'r');
        fclose(STDOUT);
        self::$stdio[] = fopen('php://stderr', 'w');
        // That the lowest free descriptors were 0 and 1 depends on fclose really closing them
        // (an extension or a php.ini setting may hold a copy): say so when it did not.
        $fd = static fn (int $n) => @readlink("/proc/self/fd/$n");
        if ($fd(1) !== false && ($fd(0) !== '/dev/null' || $fd(1) !== $fd(2))) {
            fwrite(STDERR, "warren: fds 0 and 1 still hold the protocol's pipes; subprocesses "
                . "inherit them\n");
        }
    }

    public static function write(array $frame): void
    {
        $flags = JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_PRESERVE_ZERO_FRACTION
            | JSON_INVALID_UTF8_SUBSTITUTE;
        $line = json_encode($frame, $flags);
        if ($line === false) {
            $line = json_encode([
                'type' => 'error',
                'id' => $frame['id'] ?? '',
                'error' => [
                    'kind' => 'handler_failed',
                    'message' => 'the result cannot be encoded as JSON: ' . json_last_error_msg(),
                    'retryable' => false,
                ],
            ]);
        }
        $line .= "\n";
        // fwrite may write part of a long line; the rest follows.
        for ($at = 0, $n = strlen($line); $at < $n; $at += $written) {
            $written = fwrite(self::$out, $at === 0 ? $line : substr($line, $at));
            if ($written === false || $written === 0) {
                break;
            }
        }
        fflush(self::$out);
    }

    public static function error(string $id, string $kind, string $message, bool $retryable): void
    {
        self::write([
            'type' => 'error',
            'id' => $id,
            'error' => ['kind' => $kind, 'message' => $message, 'retryable' => $retryable],
        ]);
    }
}

/**
 * Serves tasks from the worker until it closes the protocol's input.
 *
 * @param array<string, callable(mixed, Context): mixed> $handlers function name => handler
 */
function serve(array $handlers): void
{
    Runner::openProtocol();
    // Warnings and notices to the log, never into the protocol.
    ini_set('display_errors', 'stderr');
    ini_set('log_errors', '0');
    // Task code's echo and print go to stderr too.
    ob_start(static function (string $buffer): string {
        fwrite(STDERR, $buffer);
        return '';
    }, 1);
    // A fatal error (out of memory, E_USER_ERROR...) ends the process: say so for the task.
    register_shutdown_function(static function (): void {
        $error = error_get_last();
        $fatal = E_ERROR | E_CORE_ERROR | E_COMPILE_ERROR | E_USER_ERROR | E_PARSE | E_RECOVERABLE_ERROR;
        if (Runner::$current !== null && $error !== null && ($error['type'] & $fatal) !== 0) {
            Runner::error(
                Runner::$current,
                'crashed',
                sprintf('PHP fatal error: %s in %s:%d', $error['message'], $error['file'], $error['line']),
                true,
            );
        }
    });

    Runner::write([
        'type' => 'ready',
        'protocol' => Runner::PROTOCOL,
        'functions' => array_map('strval', array_keys($handlers)),
        'runtime' => 'php ' . PHP_VERSION,
    ]);
    while (($line = fgets(Runner::$in)) !== false) {
        $line = trim($line);
        if ($line === '') {
            continue;
        }
        $task = json_decode($line, true);
        if (!is_array($task) || ($task['type'] ?? null) !== 'task') {
            // A frame type of a later protocol version.
            continue;
        }
        $id = (string) ($task['id'] ?? '');
        $function = (string) ($task['function'] ?? '');
        Runner::$current = $id;
        try {
            if (!isset($handlers[$function])) {
                throw new Permanent("this runner has no handler for {$function}", 'unknown_function');
            }
            $ctx = new Context(
                $id,
                $function,
                (int) ($task['attempt'] ?? 1),
                (int) ($task['max_attempts'] ?? 1),
                (bool) ($task['redelivered'] ?? false),
                isset($task['deadline']) ? (int) $task['deadline'] : null,
            );
            $result = ($handlers[$function])($task['args'] ?? null, $ctx);
            ob_flush();
            Runner::write(['type' => 'result', 'id' => $id, 'result' => $result]);
        } catch (TaskError $e) {
            ob_flush();
            Runner::error($id, $e->kind, $e->getMessage(), $e->retryable);
        } catch (\Throwable $e) {
            ob_flush();
            Runner::error($id, 'handler_failed', get_class($e) . ': ' . $e->getMessage(), true);
        }
        Runner::$current = null;
    }
}
