<?php
// An example task file for a PHP pool:
//   warren-worker --exec 'php runners/php/example.php' --exec-functions send_mail,slugify
//   warren call send_mail '{"from":"shop@example.com","to":"you@example.com","contents":"Hi"}'
declare(strict_types=1);

require __DIR__ . '/warren.php';

Warren\serve([
    // The seed application's task, in its own argument shape.
    'send_mail' => function (array $args, Warren\Context $ctx): array {
        foreach (['from', 'to', 'contents'] as $field) {
            if (!isset($args[$field]) || !is_string($args[$field])) {
                throw new Warren\Permanent("missing string field {$field}", 'invalid_args');
            }
        }
        $headers = "From: {$args['from']}\r\nMessage-ID: <{$ctx->id}@warren>";
        // mail() needs a local MTA; without one this is a retryable failure.
        if (!mail($args['to'], $args['subject'] ?? '', $args['contents'], $headers)) {
            throw new RuntimeException('mail() failed (is sendmail installed?)');
        }
        return ['message_id' => "<{$ctx->id}@warren>", 'attempt' => $ctx->attempt];
    },
    'slugify' => function (array $args): string {
        $slug = strtolower(trim((string) preg_replace('/[^A-Za-z0-9]+/', '-', (string) ($args['text'] ?? '')), '-'));
        if ($slug === '') {
            throw new Warren\Permanent('nothing to slugify', 'invalid_args');
        }
        return $slug;
    },
]);
