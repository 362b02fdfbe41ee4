<?php
// A Workerman-style Text-protocol task server for the pool tests, on stream_socket_server:
// one JSON line {"function": ..., "args": ...} in, one JSON line out, several clients at once.
declare(strict_types=1);

$port = (int) ($argv[1] ?? 12345);
$server = stream_socket_server("tcp://127.0.0.1:{$port}", $errno, $error);
if ($server === false) {
    fwrite(STDERR, "cannot listen on {$port}: {$error}\n");
    exit(1);
}
$clients = [];
$buffers = [];
while (true) {
    $read = array_merge([$server], $clients);
    $write = $except = null;
    if (stream_select($read, $write, $except, null) === false) {
        continue;
    }
    foreach ($read as $stream) {
        if ($stream === $server) {
            $client = stream_socket_accept($server, 0);
            if ($client !== false) {
                $clients[(int) $client] = $client;
                $buffers[(int) $client] = '';
            }
            continue;
        }
        $chunk = fread($stream, 65536);
        if ($chunk === '' || $chunk === false) {
            unset($clients[(int) $stream], $buffers[(int) $stream]);
            fclose($stream);
            continue;
        }
        $buffers[(int) $stream] .= $chunk;
        while (($newline = strpos($buffers[(int) $stream], "\n")) !== false) {
            $line = substr($buffers[(int) $stream], 0, $newline);
            $buffers[(int) $stream] = substr($buffers[(int) $stream], $newline + 1);
            $task = json_decode($line, true);
            usleep(2000);
            $result = match ($task['function'] ?? '') {
                'add' => ['sum' => $task['args']['a'] + $task['args']['b']],
                default => ['error' => 'unknown function'],
            };
            fwrite($stream, json_encode($result) . "\n");
        }
    }
}
