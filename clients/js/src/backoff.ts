/** The reconnect policy: exponential backoff with full jitter. */

/** Bounds of the delays between reconnect attempts. */
export interface ReconnectOptions {
  /** The first attempt's ceiling, in ms (default 500). */
  minDelayMs?: number;
  /** The largest ceiling, in ms (default 30000). */
  maxDelayMs?: number;
  /** Attempts before giving up; `Infinity` (the default) never gives up. */
  maxAttempts?: number;
}

/** A {@link ReconnectOptions} with every bound set. */
export interface ReconnectPolicy {
  minDelayMs: number;
  maxDelayMs: number;
  maxAttempts: number;
}

/** The policy with defaults filled in. */
export function reconnectPolicy(options: ReconnectOptions = {}): ReconnectPolicy {
  const minDelayMs = Math.max(1, options.minDelayMs ?? 500);
  return {
    minDelayMs,
    maxDelayMs: Math.max(minDelayMs, options.maxDelayMs ?? 30_000),
    maxAttempts: options.maxAttempts ?? Number.POSITIVE_INFINITY,
  };
}

/** The ceiling of attempt `attempt` (0-based): doubling from the minimum up to the maximum. */
export function ceilingMs(policy: ReconnectPolicy, attempt: number): number {
  return Math.min(policy.maxDelayMs, policy.minDelayMs * 2 ** Math.min(attempt, 30));
}

/** The delay before attempt `attempt`: uniform in `[0, ceiling]` (full jitter). */
export function delayMs(policy: ReconnectPolicy, attempt: number, random: () => number = Math.random): number {
  return Math.floor(random() * (ceilingMs(policy, attempt) + 1));
}
